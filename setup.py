"""Build of the optional C++/CUDA extension srel_fast._C.

Switches (environment variables), in the manner of flash-attention:
- SREL_FAST_BUILD_EXT=0   never build the extension here (it can still be
                          compiled lazily at first use, see kernels/_ext.py);
- SREL_FAST_FORCE_CUDA=1  compile the CUDA kernels even without a visible GPU
                          (needs nvcc and a CUDA build of torch);
- SREL_FAST_NO_CUDA=1     CPU kernels only.
Without torch importable at build time (pip's default build isolation) the
package installs pure-Python; use `pip install --no-build-isolation -e .` to
build the extension ahead of time.
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("SREL_FAST_BUILD_EXT", "1") != "0":
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        torch = None
    if torch is not None:
        here = os.path.dirname(os.path.abspath(__file__))
        cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
        cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
        want_cuda = (
            os.environ.get("SREL_FAST_NO_CUDA", "0") != "1"
            and torch.version.cuda is not None
            and CUDA_HOME is not None
            and (torch.cuda.is_available() or os.environ.get("SREL_FAST_FORCE_CUDA", "0") == "1")
        )
        cxx = ["-O3", "-fopenmp"]
        if want_cuda:
            ext = CUDAExtension(
                "srel_fast._C",
                cpp + cu,
                extra_compile_args={"cxx": cxx + ["-DSREL_FAST_WITH_CUDA"], "nvcc": ["-O3", "-DSREL_FAST_WITH_CUDA"]},
                extra_link_args=["-fopenmp"],
            )
        else:
            ext = CppExtension("srel_fast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        ext_modules.append(ext)
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
