"""CPU checks of the pure index arithmetic of the CUDA kernels (tests/cpp/cuda_logic_test.cpp):
the level-synchronous exact DP of kmeans_cuda.cu (csrc/kmeans/dp_levels.h) against the
recursive divide and conquer and a brute-force DP, the warp Lloyd's unchained boundary search,
covariance_cuda.cu's tile-pair enumeration and hessian_cuda.cu's output tiles over gridDim.x; and
the CPU exact DP's demand mode (tests/cpp/exact_dp_test.cpp: skipped rows never change the
answer, whatever the hints). Built with the host C++ compiler; no GPU."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tests" / "cpp" / "cuda_logic_test.cpp"
DP_SRC = ROOT / "tests" / "cpp" / "exact_dp_test.cpp"


def _cxx():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_cuda_index_logic_on_cpu(tmp_path):
    cxx = _cxx()
    if cxx is None or not SRC.exists() or not (ROOT / "csrc").is_dir():
        pytest.skip("needs the source tree and a C++ compiler")
    exe = tmp_path / "cuda_logic_test"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), str(SRC), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("openmp", [False, True], ids=["serial", "openmp"])
def test_exact_dp_demand_mode_on_cpu(tmp_path, openmp):
    cxx = _cxx()
    if cxx is None or not DP_SRC.exists() or not (ROOT / "csrc").is_dir():
        pytest.skip("needs the source tree and a C++ compiler")
    exe = tmp_path / "exact_dp_test"
    flags = ["-fopenmp", "-DPOPCOMP_OPENMP=1"] if openmp else []
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", *flags, "-I", str(ROOT / "csrc"), str(DP_SRC), "-o", str(exe)],
        capture_output=True, text=True,
    )
    if build.returncode != 0 and openmp:
        pytest.skip("the C++ compiler has no OpenMP: " + build.stderr[-300:])
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "failures 0" in run.stdout
