import pytest
import torch

import popcomp


def cuda_ok() -> bool:
    return popcomp.backends()["cuda"]["usable"]


requires_cuda = pytest.mark.skipif(not cuda_ok(), reason="needs a CUDA device and a CUDA build")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
