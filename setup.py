"""Installable package for horovod_leader.

The compiled extension ``horovod_leader._fused`` (the fused two-force update) is built
when a C++ compiler is available: a CPU kernel always, and a CUDA kernel as well when a
CUDA toolkit is found. Without it the package still works through the pure-PyTorch
fallback in ``horovod_leader.fused``.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("horovod_leader", "csrc")


def extension_kwargs():
    """Return ext_modules/cmdclass for the fused kernel, or {} when it cannot be built."""
    if os.environ.get("HOROVOD_LEADER_NO_EXTENSION") == "1" or not os.path.isdir(os.path.join(HERE, CSRC)):
        return {}
    # torch guesses the toolkit from the nvcc on PATH, which may be a wrapper outside the
    # toolkit; prefer the conventional location when nothing says otherwise.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        from torch.utils import cpp_extension
    except ImportError:  # torch is needed to build the extension, not to install the package
        return {}
    sources = [os.path.join(CSRC, "fused_update.cpp"), os.path.join(CSRC, "codec.cpp")]
    macros = []
    extension = cpp_extension.CppExtension
    cuda_home = cpp_extension.CUDA_HOME
    has_toolkit = cuda_home and all(os.path.exists(os.path.join(cuda_home, *parts))
                                    for parts in (("bin", "nvcc"), ("include", "cuda_runtime.h")))
    if os.environ.get("HOROVOD_LEADER_NO_CUDA") != "1" and has_toolkit:
        sources.append(os.path.join(CSRC, "fused_update_cuda.cu"))
        macros.append(("WITH_CUDA", None))
        extension = cpp_extension.CUDAExtension
    # Hopper (H100/H200) plus the common data-centre generations unless the user says otherwise.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = extension(
        name="horovod_leader._fused",
        sources=sources,
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


setup(
    name="horovod_leader",
    version="0.1.0",
    description="Leader SGD (LSGD) and GRAWA distributed optimizers for PyTorch over Horovod and MPI",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["horovod_leader", "horovod_leader.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    extras_require={"distributed": ["horovod>=0.28", "mpi4py>=3.1"], "train": ["torchvision", "scikit-learn", "tqdm", "matplotlib"]},
    entry_points={"console_scripts": [
        "horovod-leader-train=horovod_leader.training.command:main",
        "horovod-leader-report=horovod_leader.training.report:main",
    ]},
    **extension_kwargs(),
)
