"""The prepared device check (bench/gpu_check.py) on a machine without a GPU: it finds every
file it would run and exits 0 without running anything."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check really runs")
def test_gpu_check_without_gpu_finds_its_files_and_exits_0():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no CUDA device" in p.stdout


def test_gpu_check_names_missing_files(monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gpu_check, "BENCHES", gpu_check.BENCHES + [("bench/nope.py", [])])
    assert gpu_check.missing_files() == ["bench/nope.py"]
    assert gpu_check.main([]) == 1
