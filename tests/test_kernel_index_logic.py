"""The C++ tests of tests/cpp, configured and built by CMake (tests/cpp/CMakeLists.txt) and run
by ctest: the pure index arithmetic of the CUDA kernels (cuda_logic_test.cpp: the
level-synchronous exact DP of kmeans_cuda.cu, csrc/kmeans/dp_levels.h, against the recursive
divide and conquer and a brute-force DP, the warp Lloyd's unchained boundary search,
covariance_cuda.cu's tile-pair enumeration and hessian_cuda.cu's output tiles over gridDim.x);
and the CPU exact DP's demand mode (exact_dp_test.cpp, serial and OpenMP builds: skipped rows
never change the answer, whatever the hints; every layer solver against brute force). Host
C++ compiler only; no GPU."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "tests" / "cpp"
TESTS = ("cuda_logic_test", "exact_dp_test_serial", "exact_dp_test_openmp")


def _cxx():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _run(cmd, cwd=None, timeout=600):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ctest_build(tmp_path_factory):
    """A build of tests/cpp in a temporary directory, configured once for this module."""
    if not (CPP / "CMakeLists.txt").exists() or not (ROOT / "csrc").is_dir():
        pytest.skip("needs the source tree (tests/cpp, csrc)")
    cmake, ctest, cxx = shutil.which("cmake"), shutil.which("ctest"), _cxx()
    if cmake is None or ctest is None:
        pytest.skip("needs cmake and ctest on PATH")
    if cxx is None:
        pytest.skip("needs a C++ compiler ($CXX, c++, g++ or clang++)")
    build = tmp_path_factory.mktemp("cpp_tests")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = _run([cmake, "-S", CPP, "-B", build, *generator, f"-DCMAKE_CXX_COMPILER={cxx}",
                "-DCMAKE_BUILD_TYPE=Release"])
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    listed = _run([ctest, "-N"], cwd=build)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    # this module's tests only (each other C++ test is built by the module that runs it)
    targets = [t for t in TESTS if f": {t}\n" in listed.stdout]
    made = _run([cmake, "--build", build, "--parallel", "--target", *targets])
    assert made.returncode == 0, made.stdout[-8000:] + made.stderr[-4000:]
    return build, ctest, listed.stdout


def _ctest(ctest_build, name):
    """Runs the ctest test `name` (it must be registered); returns its output."""
    build, ctest, listed = ctest_build
    assert f": {name}\n" in listed, listed
    run = _run([ctest, "--output-on-failure", "--verbose", "--no-tests=error", "-R", f"^{name}$"],
               cwd=build)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr
    assert "100% tests passed, 0 tests failed out of 1" in run.stdout, run.stdout[-8000:]
    return run.stdout


def test_cuda_index_logic_on_cpu(ctest_build):
    _ctest(ctest_build, "cuda_logic_test")


@pytest.mark.parametrize("openmp", [False, True], ids=["serial", "openmp"])
def test_exact_dp_demand_mode_on_cpu(ctest_build, openmp):
    name = "exact_dp_test_openmp" if openmp else "exact_dp_test_serial"
    if openmp and f": {name}\n" not in ctest_build[2]:
        pytest.skip("CMake found no OpenMP for the C++ compiler")
    out = _ctest(ctest_build, name)
    assert "failures 0" in out
