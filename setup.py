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
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _stable_pybind11(build_temp: Path) -> Path:
    """pybind11's CMake package and headers, copied once per version into the build directory.

    pip builds in a fresh temporary environment each time: its pybind11 include path would change from
    one install to the next, and with it the compile command of every binding source, which would then
    all be recompiled. A copy at a path that does not change keeps those commands (and so the objects).
    """
    import pybind11

    src = Path(pybind11.get_cmake_dir()).parents[2]  # .../pybind11 (share/cmake/pybind11 -> package)
    dst = build_temp / f"pybind11-{pybind11.__version__}"
    done = dst / ".copied"
    if not done.exists():
        shutil.rmtree(dst, ignore_errors=True)
        for part in ("include", "share"):
            shutil.copytree(src / part, dst / part)
        done.touch()
    return dst / "share" / "cmake" / "pybind11"


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("D2R_BUILD_TYPE", "Release")
        # One build directory per platform and Python (setuptools' build/temp.<platform>-<python tag>, in
        # the source tree; --build-temp moves it), kept from one install to the next: installing extras one
        # after another (pip install ".[demo]", then ".[test]") compiles the core once. `rm -rf build`
        # forces a clean rebuild.
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={_stable_pybind11(build_temp)}",
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
        # The cache of an earlier build is kept (the tools of its temporary environment are gone, but every
        # path that names them is passed again above); a configure that still fails on it (another
        # generator, a moved source tree) starts from a fresh cache, and the build then recompiles only
        # what the new configuration changed.
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        configure = ["cmake", str(ROOT), *args]
        if subprocess.run(configure, cwd=build_temp).returncode != 0:
            print("d2r: configuring on the kept CMake cache failed; configuring from a fresh cache", flush=True)
            (build_temp / "CMakeCache.txt").unlink(missing_ok=True)
            subprocess.run(configure, cwd=build_temp, check=True)
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
