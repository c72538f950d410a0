"""Build d2r: setuptools hands the native build to CMake (pybind11's cmake_example pattern).

Environment switches:
  D2R_NATIVE_ARCH=1   compile for this machine's CPU only (-march=native); default: a portable
                      binary whose SIMD level (scalar, avx2, avx512) is picked at import
  D2R_CUDA=OFF        never compile cuda/, even where nvcc exists
  D2R_BUILD_TYPE      CMake build type (default Release)
  D2R_SANITIZE=1      build with AddressSanitizer + UBSan (for the C++ tests)
  D2R_CUDA_ARCH       CUDA architectures (CMake list, default "80;90")
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("D2R_BUILD_TYPE", "Release")
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DD2R_NATIVE_ARCH={'ON' if os.environ.get('D2R_NATIVE_ARCH', '0') in ('1', 'ON', 'on') else 'OFF'}",
            f"-DD2R_CUDA={os.environ.get('D2R_CUDA', 'AUTO')}",
            f"-DD2R_SANITIZE={'ON' if os.environ.get('D2R_SANITIZE', '0') in ('1', 'ON', 'on') else 'OFF'}",
            "-DD2R_BUILD_PYTHON=ON",
        ]
        if os.environ.get("D2R_CUDA_ARCH"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['D2R_CUDA_ARCH']}")
        try:
            import ninja

            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}"]
        except ImportError:
            pass
        # pip builds in a fresh temporary environment each time: a cache left by an earlier build
        # points at tools that no longer exist, so configure from scratch (objects are still reused).
        cache = build_temp / "CMakeCache.txt"
        if cache.exists():
            cache.unlink()
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--target", "_native", "-j", jobs], cwd=build_temp, check=True)


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    # The type stub of the extension (d2r/_native.pyi) and the PEP 561 marker ship with the package.
    package_data={"d2r": ["py.typed", "_native.pyi"]},
    ext_modules=[CMakeExtension("d2r._native")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
