"""The CUDA kernels run only where popcomp's own CUDA runtime can use the device ("usable"),
not merely where they were built: with CUDA tensors and a runtime that cannot use the device
(its statically linked CUDA runtime newer than the driver), every op runs its pure-torch
reference on the device after one warning that names the driver and build versions and the fix.
Also the exact DP's workspace budget on CUDA and the error of a workspace the device cannot
hold. Checked here without a GPU by standing in for the compiled core's runtime queries and for
torch.cuda.is_available()."""
import importlib
import types
import warnings

import pytest
import torch

import popcomp
from popcomp import _backend

OPS = ("kmeans1d", "sumsq_outer_acc", "covariance_accumulate", "greedy_select")


class _Core:
    """Stands in for popcomp._C's runtime queries: a CUDA build that sees `devices` devices."""

    has_cuda = True
    has_openmp = False

    def __init__(self, devices, build=13000, driver=12040,
                 error="CUDA driver version is insufficient for CUDA runtime version "
                       "(cudaErrorInsufficientDriver)"):
        self.devices, self.build, self.driver, self.error = devices, build, driver, error

    def cuda_device_count(self):
        return self.devices

    def cuda_build_version(self):
        return self.build

    def cuda_driver_version(self):
        return self.driver

    def cuda_device_error(self):
        return "" if self.devices else self.error


@pytest.fixture
def core(monkeypatch):
    """Installs a stand-in core (a factory: core(devices, ...)) and a torch that sees a GPU."""
    def install(devices, torch_sees_gpu=True, **kw):
        stub = _Core(devices, **kw)
        monkeypatch.setattr(_backend, "_C", stub)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_sees_gpu)
        _backend._cuda_runtime_state.cache_clear()
        monkeypatch.setattr(_backend, "_FALLBACK_WARNED", False)
        return stub

    yield install
    _backend._cuda_runtime_state.cache_clear()


def _cuda_like():
    """Only the device of a CUDA tensor (cuda_fallback looks at nothing else)."""
    return types.SimpleNamespace(device=torch.device("cuda", 0))


def test_old_driver_is_built_but_not_usable(core):
    core(devices=0)
    assert _backend.cuda_built() and not _backend.cuda_usable()
    info = _backend.backends()["cuda"]
    assert info["built"] and not info["usable"] and info["devices"] == 0
    assert info["build_cuda_version"] == 13000 and info["driver_cuda_version"] == 12040
    reason = info["error"]
    assert reason == _backend.cuda_unusable_reason()
    # says why (the two versions, the runtime's own error) and how to fix it
    for part in ("CUDA 13.0", "CUDA 12.4", "linked statically", "cudaErrorInsufficientDriver",
                 "Update the driver", "pip install --no-build-isolation", "nvcc"):
        assert part in reason, (part, reason)


def test_runtime_that_sees_the_device_is_usable(core):
    core(devices=2)
    assert _backend.cuda_usable() and _backend.cuda_unusable_reason() is None
    info = _backend.backends()["cuda"]
    assert info["usable"] and info["devices"] == 2 and "error" not in info
    assert not _backend.cuda_fallback(_cuda_like(), "kmeans1d")


def test_no_gpu_for_torch_is_not_usable(core):
    core(devices=1, torch_sees_gpu=False)
    assert not _backend.cuda_usable()
    assert _backend.cuda_unusable_reason() == "torch sees no CUDA device"


def test_other_runtime_errors_are_reported(core):
    # a driver new enough, and still no device: the runtime's error, not a version story
    core(devices=0, driver=13010, error="no CUDA-capable device is detected (cudaErrorNoDevice)")
    reason = _backend.cuda_unusable_reason()
    assert "cudaErrorNoDevice" in reason and "driver: CUDA 13.1" in reason
    assert "linked statically" not in reason


def test_fallback_only_for_cuda_tensors_and_warns_once(core):
    core(devices=0)
    assert not _backend.cuda_fallback(torch.zeros(1), "kmeans1d")  # CPU tensors: never
    with pytest.warns(RuntimeWarning, match=r"popcomp::kmeans1d on CUDA runs its pure-torch "
                                            r"reference.*CUDA 12\.4"):
        assert _backend.cuda_fallback(_cuda_like(), "kmeans1d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert _backend.cuda_fallback(_cuda_like(), "greedy_select")


class _NoKernel:
    has_cuda = True

    def __getattr__(self, name):
        raise AssertionError(f"popcomp._C.{name} reached although CUDA is not usable")


def _args():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    return {
        "kmeans1d": (x, torch.rand(3, 40, generator=g, dtype=torch.float64), 3, 0.1, "lloyd",
                     "kmeans++", None, 20, 0.0, 5, "squared"),
        "sumsq_outer_acc": (torch.zeros(5, 7), torch.randn(3, 2, 4, 5, generator=g),
                            torch.randn(3, 4, 7, generator=g)),
        "covariance_accumulate": (torch.randn(6, 4, generator=g), torch.zeros(4, 4),
                                  torch.zeros((), dtype=torch.int64)),
        "greedy_select": (torch.eye(4, dtype=torch.float64) + 0.1, 2,
                          torch.zeros(4, dtype=torch.float64), 0.5, None),
    }


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_fall_back_to_the_reference(op, monkeypatch):
    """Each CUDA kernel, told that its tensor is on a device popcomp cannot use, returns (and
    accumulates) what the op's reference does, and never reaches the compiled core."""
    module = importlib.import_module(f"popcomp.ops.backends.cuda.{op}")
    reference = getattr(importlib.import_module(f"popcomp.ops.backends.reference.{op}"),
                        f"{op}_reference")
    seen = []
    monkeypatch.setattr(module, "compiled", lambda: _NoKernel())
    monkeypatch.setattr(module, "cuda_fallback", lambda t, name: seen.append(name) or True)
    got_args, want_args = _args()[op], _args()[op]
    got = getattr(module, f"{op}_cuda")(*got_args)
    want = reference(*want_args)
    assert seen == [op]
    if want is None:  # the accumulating ops: their accumulators
        for a, b in zip(got_args, want_args):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
    else:
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.skipif(not (_backend.cuda_built() and torch.cuda.is_available()),
                    reason="needs a CUDA build and a GPU that torch sees")
def test_usable_wherever_torch_has_cuda():
    """On a GPU machine a CUDA build must be usable: otherwise every CUDA test would skip and
    every op would run its reference (the reason says why)."""
    info = popcomp.backends()["cuda"]
    assert info["usable"] == torch.cuda.is_available(), info.get("error")
    assert info["devices"] == torch.cuda.device_count()


# ---- the exact DP's workspace on CUDA: budget and the error of a row too large ------------------


def test_dp_budget(monkeypatch):
    """POPCOMP_CUDA_DP_BUDGET when set (a bad value warns and is ignored), else 1/8 of the
    device's memory and at least 1 GiB."""
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=80 << 30))
    monkeypatch.delenv("POPCOMP_CUDA_DP_BUDGET", raising=False)
    assert _backend.cuda_dp_budget(cuda0) == 10 << 30
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=4 << 30))
    assert _backend.cuda_dp_budget(cuda0) == 1 << 30
    monkeypatch.setenv("POPCOMP_CUDA_DP_BUDGET", "12345")
    assert _backend.cuda_dp_budget(cuda0) == 12345
    monkeypatch.setenv("POPCOMP_CUDA_DP_BUDGET", "lots")
    with pytest.warns(UserWarning, match="POPCOMP_CUDA_DP_BUDGET"):
        assert _backend.cuda_dp_budget(cuda0) == 1 << 30


class _Core2:
    """Stands in for the compiled core's K-means entry points: records the budget they get."""

    def __init__(self, nbytes):
        self.nbytes, self.budgets = nbytes, []

    def kmeans1d_cuda_workspace(self, dp_budget, **kwargs):
        self.budgets.append(dp_budget)
        return self.nbytes

    def kmeans1d_cuda(self, dp_budget, **kwargs):
        self.budgets.append(dp_budget)


@pytest.mark.parametrize("method", ["exact", "lloyd"])
def test_kmeans_workspace_too_large_is_a_clear_error(method, monkeypatch):
    """A workspace the device cannot hold (one huge row for the exact DP) is an
    OutOfMemoryError that names the problem and the way out, raised before the kernel."""
    module = importlib.import_module("popcomp.ops.backends.cuda.kmeans1d")
    core = _Core2(13 << 30)

    def no_memory(nbytes, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.00 GiB")

    monkeypatch.setattr(module, "compiled", lambda: core)
    monkeypatch.setattr(module, "cuda_stream_args", lambda t: (0, 0))
    monkeypatch.setattr(module, "cuda_workspace", no_memory)
    monkeypatch.setenv("POPCOMP_CUDA_DP_BUDGET", str(1 << 20))
    x = torch.randn(1, 1000)
    with pytest.raises(torch.cuda.OutOfMemoryError) as err:
        module.kmeans1d_cuda(x, None, 16, 0.0, method, "kmeans++", None, 10, 0.0, 0, "squared")
    msg = str(err.value)
    assert "13.00 GiB of workspace for 1 row(s) of 1000 values" in msg and "k = 16" in msg
    assert ("use method='lloyd'" in msg) == (method == "exact")
    assert "Tried to allocate" in msg  # torch's own message kept
    assert core.budgets == [1 << 20]  # the workspace was sized with the budget; no kernel ran
