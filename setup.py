"""Build iics_fast: the Python package, the Triton kernels (as iics_fast.kernels) and the
pybind11 extension iics_fast._C, compiled by CMake from CMakeLists.txt.

Environment: IICS_WITH_CUDA=1 builds the optional CUDA sources; IICS_NATIVE=0 drops
-march=native (for wheels meant for other machines); CMAKE_BUILD_PARALLEL_LEVEL as usual.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DIICS_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DIICS_WITH_CUDA={'ON' if os.environ.get('IICS_WITH_CUDA') == '1' else 'OFF'}",
            f"-DIICS_NATIVE={'OFF' if os.environ.get('IICS_NATIVE') == '0' else 'ON'}",
        ]
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_temp), "-j", jobs], check=True)


setup(
    name="iics_fast",
    version="0.1.0",
    description="Fast, faithful IICS (intra-inter camera similarity) for unsupervised person re-ID",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["iics_fast", "iics_fast.*"]) + ["iics_fast.kernels"],
    package_dir={"iics_fast": "iics_fast", "iics_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension("iics_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.23",
        "triton>=3.0; platform_system == 'Linux'",
        "pillow>=9",
        "faiss-cpu>=1.7.4",
        "tqdm>=4.60",
        "matplotlib>=3.6",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "scipy>=1.9",
            "scikit-learn>=1.2",
            "fastcluster>=1.2",
            "ruff==0.17.6",  # the linter the README and .ci/run run (`ruff check .`)
        ],
        # the benchmarks' peers beyond the test extras; fast-reid itself: pip install --no-deps
        # fastreid (its wheel pins torch 1.13.1), see benchmarks/bench_evaluation.py
        "bench": ["cython>=3"],
    },
    zip_safe=False,
)
