"""Loads the optional C++ CPU kernels in one place and remembers why they did or did not load.

In order: a prebuilt `oar_kernels._C` (built by `pip install --no-build-isolation`); else,
where a C++ compiler is found, the sources shipped with the package are compiled once into
a cache directory on first import (torch.utils.cpp_extension, which locks the directory so
concurrent processes build once); else the vectorized torch path, with one warning naming
the fix. `OAR_KERNELS_NO_EXTENSION=1` forces the torch path; `OAR_KERNELS_BUILD_DIR` moves
the cache (default ~/.cache/oar_kernels/<torch version>-<source hash>).
"""

import hashlib
import importlib
import importlib.machinery
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from oar_kernels import _ops  # noqa: F401  (the schemas exist before the C++ kernels register)

LOADED = False
STATUS = "not compiled"
# -fno-trapping-math lets GCC vectorise the select-heavy loops (results unchanged). No
# OpenMP: rows go to torch's inter-op pool (csrc/reshape.cpp, RowQueue). setup.py uses these.
CXX_FLAGS = ["-O3", "-fno-trapping-math"]
SLOW_PATH = "the CPU ops use their torch path (reshape 12-75x slower)"


def sources() -> list[Path]:
    """The C++ sources: shipped in the package (`_csrc/`, wheels) or the checkout's csrc/."""
    here = Path(__file__).resolve().parent
    for folder in (here / "_csrc", here.parent / "csrc"):
        found = sorted(folder.glob("*.cpp"))
        if found:
            return found
    return []


def build_dir(files: list[Path]) -> Path:
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    default = Path.home() / ".cache" / "oar_kernels"
    root = Path(os.environ.get("OAR_KERNELS_BUILD_DIR") or default)
    return root / f"torch-{torch.__version__}-{digest}"


def build_and_load(files: list[Path]) -> Path:
    """Compiles the sources into build_dir (once; later imports reuse the library) and loads
    them, which registers the CPU kernels. Returns the directory."""
    from torch.utils import cpp_extension

    where = build_dir(files)
    where.mkdir(parents=True, exist_ok=True)
    if not any(where.glob("*.so")):
        print(
            f"oar-kernels: compiling the C++ CPU kernels once into {where} (about a minute)",
            file=sys.stderr,
        )
    cpp_extension.load(
        name="oar_kernels_cpu",
        sources=[str(f) for f in files],
        extra_cflags=CXX_FLAGS,
        build_directory=str(where),
        is_python_module=False,
    )
    return where


def _load() -> tuple[bool, str]:
    if os.environ.get("OAR_KERNELS_NO_EXTENSION") == "1":
        return False, "disabled by OAR_KERNELS_NO_EXTENSION=1"
    # Only a library next to this file: an editable install elsewhere on the path must not
    # lend its build to another copy of the package.
    here = str(Path(__file__).resolve().parent)
    if importlib.machinery.PathFinder.find_spec("oar_kernels._C", [here]) is not None:
        try:
            module = importlib.import_module("oar_kernels._C")  # importing registers kernels
        except ImportError:
            pass  # built against another torch, say: compiled afresh below where possible
        else:
            return True, f"loaded from {module.__file__}"
    files = sources()
    compiler = os.environ.get("CXX", "c++")
    if not files or shutil.which(compiler) is None:
        missing = "sources" if not files else f"C++ compiler ({compiler})"
        return False, f"not compiled (no {missing} found): {SLOW_PATH}"
    try:
        where = build_and_load(files)
    except Exception as exc:  # noqa: BLE001  (any build failure means the torch path)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return False, f"compiling on first use failed ({reason}): {SLOW_PATH}"
    return True, f"compiled on first use, loaded from {where}"


LOADED, STATUS = _load()
if not LOADED and "OAR_KERNELS_NO_EXTENSION" not in os.environ:
    warnings.warn(
        f"oar-kernels: C++ extension {STATUS}. Fix: install a C++ compiler (it is then built on "
        "first import) or `pip install --no-build-isolation oar-kernels`",
        stacklevel=2,
    )
