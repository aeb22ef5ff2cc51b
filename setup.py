"""Builds the optional C++ CPU extension `oar_kernels._C` when torch is importable.

With `pip install --no-build-isolation .` the extension is compiled against the installed
torch; in an isolated build (no torch) the package installs as pure Python and every op
falls back to its vectorized torch path.
"""
import glob
import os
import shutil

from setuptools import setup


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
        # -fno-trapping-math lets GCC vectorise the select-heavy loops (results unchanged).
        # No OpenMP: rows go to torch's inter-op pool (csrc/reshape.cpp, RowQueue).
        extra_compile_args={"cxx": ["-O3", "-fno-trapping-math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
