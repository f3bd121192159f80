import pytest
import torch

import popcomp

CUDA_USABLE = popcomp.backends()["cuda"]["usable"]
NO_CUDA = "needs a CUDA device and a CUDA build"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_USABLE,
                                                                             reason=NO_CUDA))])
def devices(request) -> str:
    """The device of one run of the test: "cpu", and "cuda" where a CUDA device and a CUDA build
    are there (skipped otherwise). Tests of ops take it so that the same assertions cover every
    device."""
    return request.param


@pytest.fixture
def cuda_device() -> str:
    """The device "cuda", for the tests that compare the CUDA kernels with the CPU ones (skipped
    without a CUDA device and a CUDA build)."""
    if not CUDA_USABLE:
        pytest.skip(NO_CUDA)
    return "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
