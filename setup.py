"""Builds the optional C++ CPU extension `oar_kernels._C` when torch is importable.

With `pip install --no-build-isolation .` the extension is compiled against the installed
torch. In an isolated build (no torch) the package installs without it, carrying the C++
sources, which oar_kernels/_extension.py compiles on first import where a compiler exists.
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


def _extension_modules():
    if os.environ.get("OAR_KERNELS_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return [], {}
    ext = CppExtension(
        name="oar_kernels._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        # Same flags as a build on first use (oar_kernels/_extension.py, CXX_FLAGS).
        extra_compile_args={"cxx": ["-O3", "-fno-trapping-math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


class BuildPyWithSources(build_py):
    """Ships csrc/*.cpp inside the package (oar_kernels/_csrc/), so that an install without
    a prebuilt extension compiles it on first import where a compiler exists."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "oar_kernels", "_csrc")
        os.makedirs(target, exist_ok=True)
        for source in sorted(glob.glob("csrc/*.cpp")):
            shutil.copy(source, target)


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
