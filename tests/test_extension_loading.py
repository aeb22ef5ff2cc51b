"""How the C++ CPU kernels load: prebuilt, compiled on first import, or the torch path with a
warning that names the fix (oar_kernels/_extension.py). The first-use compile itself runs in
CI's wheel check (.ci/wheel), which installs a wheel without a prebuilt extension."""

import shutil
import subprocess
import sys

from oar_kernels import _extension

REPORT = (
    "import warnings, oar_kernels as ok\n"
    "from oar_kernels import _extension, _info\n"
    "print(_extension.LOADED, _extension.STATUS)\n"
    "print(_info.backends()['bilevel_weights']['cpu'])\n"
    "import torch\n"
    "w = ok.bilevel_weights(torch.tensor([[0.0, 1.0, 3.0]]), torch.ones(1, 3, dtype=torch.bool))\n"
    "assert abs(w.mean().item() - 1) < 1e-6\n"
)


def _copy_without_prebuilt(tmp_path):
    """The package and its C++ sources as a wheel without a prebuilt extension has them."""
    root = _extension.sources()[0].parent.parent
    shutil.copytree(
        root / "oar_kernels",
        tmp_path / "oar_kernels",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    return tmp_path


def _run(cwd, **env):
    import os

    done = subprocess.run(
        [sys.executable, "-c", REPORT],
        cwd=cwd,
        env={**os.environ, "OAR_KERNELS_BUILD_DIR": str(cwd / "ext"), **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_without_a_compiler_the_torch_path_runs_and_a_warning_names_the_fix(tmp_path):
    out, err = _run(_copy_without_prebuilt(tmp_path), CXX="no-such-compiler-here")
    loaded, backend = out.splitlines()[0], out.splitlines()[1]
    assert loaded.startswith("False not compiled (no C++ compiler (no-such-compiler-here)")
    assert backend == "torch (vectorized)"
    assert "Fix: install a C++ compiler" in err and "--no-build-isolation" in err
    assert "partially initialized" not in out + err  # the old, bug-like message


def test_disabled_extension_is_quiet(tmp_path):
    out, err = _run(_copy_without_prebuilt(tmp_path), OAR_KERNELS_NO_EXTENSION="1")
    assert out.startswith("False disabled by OAR_KERNELS_NO_EXTENSION=1")
    assert "Fix:" not in err


def test_sources_are_found_and_the_build_dir_follows_them(tmp_path, monkeypatch):
    files = _extension.sources()
    assert {f.name for f in files} >= {"reshape.cpp", "module.cpp"}
    monkeypatch.setenv("OAR_KERNELS_BUILD_DIR", str(tmp_path))
    where = _extension.build_dir(files)
    assert where.parent == tmp_path and where.name.startswith("torch-")
    assert _extension.build_dir(files[:1]) != where  # other sources, another build
