"""The ops ``torch.ops.popcomp.*`` called directly with bad arguments raise a TypeError or
ValueError naming the argument, on every device and from every kernel (CPU, CUDA, the
reference default, the fake/meta kernel), before any address reaches a compiled kernel; the
raw bindings of popcomp._C check their sizes, codes and addresses too, and the codes popcomp
reads from popcomp._C equal the copies it falls back on without a build.

Before these checks, a wrong ``acc`` shape corrupted the heap (covariance_accumulate), wrong
``weights``/``init_centers``/``tau`` shapes were read out of bounds, tensors on another device
were silently read through their addresses, and other mistakes gave KeyErrors or unpacking
errors. The CUDA kernels are checked here without a GPU by handing them a stand-in compiled
module that fails the test if any of its functions is reached."""
import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import popcomp
from popcomp import _backend
from popcomp._backend import compiled
from popcomp.ops import checks

OPS = torch.ops.popcomp
F64 = torch.float64
I64 = torch.int64


def _km(dev, other, x=None, weights=None, k=2, beta=0.0, method="lloyd", init="kmeans++",
        init_centers=None, max_iter=10, tol=0.0, seed=0, diameter="squared"):
    x = torch.randn(3, 8, device=dev) if x is None else x
    return (x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)


def _cov(dev, other, x=None, acc=None, count=None):
    x = torch.randn(10, 4, device=dev) if x is None else x
    acc = torch.zeros(4, 4, device=dev) if acc is None else acc
    count = torch.zeros((), dtype=I64, device=dev) if count is None else count
    return (x, acc, count)


def _greedy(dev, other, cov=None, k=2, tau=None, theta=1.0, Z=None):
    cov = torch.eye(4, dtype=F64, device=dev) if cov is None else cov
    tau = torch.zeros(4, dtype=F64, device=dev) if tau is None else tau
    return (cov, k, tau, theta, Z)


def _sumsq(dev, other, acc=None, g=None, x=None):
    acc = torch.zeros(5, 7, device=dev) if acc is None else acc
    g = torch.randn(3, 2, 4, 5, device=dev) if g is None else g
    x = torch.randn(3, 4, 7, device=dev) if x is None else x
    return (acc, g, x)


# (op, builder of the arguments on (device, other device), exception, message)
CASES = [
    ("kmeans1d", lambda d, o: _km(d, o, x=torch.randn(8, device=d)), ValueError, "x must be 2-D"),
    ("kmeans1d", lambda d, o: _km(d, o, x=torch.ones(3, 8, dtype=I64, device=d)), TypeError,
     "x must have a floating dtype"),
    ("kmeans1d", lambda d, o: _km(d, o, x=torch.randn(3, 0, device=d)), ValueError, "at least one value"),
    ("kmeans1d", lambda d, o: _km(d, o, weights=torch.ones(1, 3, device=d)), ValueError,
     r"weights must have the shape of x \(3, 8\)"),
    ("kmeans1d", lambda d, o: _km(d, o, weights=torch.ones(3, 8, device=o)), ValueError,
     "weights is on .* but x is on"),
    ("kmeans1d", lambda d, o: _km(d, o, weights=torch.ones(3, 8, dtype=torch.int32, device=d)),
     TypeError, "weights must have a floating dtype"),
    ("kmeans1d", lambda d, o: _km(d, o, k=0), ValueError, "k must be >= 1"),
    ("kmeans1d", lambda d, o: _km(d, o, beta=float("nan")), ValueError, "beta must be finite"),
    ("kmeans1d", lambda d, o: _km(d, o, beta=-1.0), ValueError, "beta must be >= 0"),
    ("kmeans1d", lambda d, o: _km(d, o, tol=-1.0), ValueError, "tol must be >= 0"),
    ("kmeans1d", lambda d, o: _km(d, o, max_iter=-1), ValueError, "max_iter must be >= 0"),
    ("kmeans1d", lambda d, o: _km(d, o, method="kmedians"), ValueError, "method must be one of"),
    ("kmeans1d", lambda d, o: _km(d, o, init="random"), ValueError, "init must be one of"),
    ("kmeans1d", lambda d, o: _km(d, o, diameter="cubic"), ValueError, "diameter must be one of"),
    ("kmeans1d", lambda d, o: _km(d, o, init="given"), ValueError, "init 'given' needs init_centers"),
    ("kmeans1d", lambda d, o: _km(d, o, init="given", init_centers=torch.zeros(1, 1, dtype=F64, device=d)),
     ValueError, r"init_centers must have shape \(rows, k\) = \(3, 2\)"),
    ("kmeans1d", lambda d, o: _km(d, o, init="given", init_centers=torch.zeros(3, 2, dtype=F64, device=o)),
     ValueError, "init_centers is on .* but x is on"),
    ("covariance_accumulate", lambda d, o: _cov(d, o, acc=torch.zeros(2, 2, device=d)), ValueError,
     r"acc must have shape \(m, m\) = \(4, 4\)"),
    ("covariance_accumulate", lambda d, o: _cov(d, o, x=torch.randn(10, device=d)), ValueError,
     r"x must be \(N, m\) or \(B, m, S\)"),
    ("covariance_accumulate", lambda d, o: _cov(d, o, x=torch.randn(2, 4, 3, 3, device=d)), ValueError,
     r"x must be \(N, m\) or \(B, m, S\)"),
    ("covariance_accumulate", lambda d, o: _cov(d, o, x=torch.ones(10, 4, dtype=torch.int32, device=d)),
     TypeError, "x must have a floating dtype"),
    ("covariance_accumulate", lambda d, o: _cov(d, o, acc=torch.zeros(4, 4, dtype=torch.float16, device=d)),
     TypeError, "acc must be float32 or float64"),
    ("covariance_accumulate", lambda d, o: _cov(d, o, acc=torch.zeros(4, 4, device=o)), ValueError,
     "acc is on .* but x is on"),
    ("covariance_accumulate", lambda d, o: _cov(d, o, count=torch.zeros(3, device=d)), TypeError,
     "count must be a 0-d int64 tensor"),
    ("covariance_accumulate", lambda d, o: _cov(d, o, count=torch.zeros((), dtype=I64, device=o)),
     ValueError, "count is on .* but x is on"),
    ("greedy_select", lambda d, o: _greedy(d, o, cov=torch.eye(4, dtype=F64, device=d)[:3]), ValueError,
     r"cov must be a square \(m, m\) matrix"),
    ("greedy_select", lambda d, o: _greedy(d, o, cov=torch.eye(4, dtype=torch.float16, device=d)),
     TypeError, "cov must be float32 or float64"),
    ("greedy_select", lambda d, o: _greedy(d, o, k=5), ValueError, "k must be <= 4"),
    ("greedy_select", lambda d, o: _greedy(d, o, k=-1), ValueError, "k must be >= 0"),
    ("greedy_select", lambda d, o: _greedy(d, o, tau=torch.zeros(1, dtype=F64, device=d)), ValueError,
     r"tau must have shape \(m,\) = \(4,\)"),
    ("greedy_select", lambda d, o: _greedy(d, o, tau=torch.zeros(4, dtype=F64, device=o)), ValueError,
     "tau is on .* but cov is on"),
    ("greedy_select", lambda d, o: _greedy(d, o, theta=1.5), ValueError, "theta must be <= 1"),
    ("greedy_select", lambda d, o: _greedy(d, o, theta=float("nan")), ValueError, "theta must be finite"),
    ("greedy_select", lambda d, o: _greedy(d, o, theta=0.5, Z=torch.eye(3, dtype=F64, device=d)), ValueError,
     r"Z must have shape \(p, m\) = \(p, 4\)"),
    ("greedy_select", lambda d, o: _greedy(d, o, theta=0.5, Z=torch.eye(4, dtype=F64, device=o)), ValueError,
     "Z is on .* but cov is on"),
    ("sumsq_outer_acc", lambda d, o: _sumsq(d, o, acc=torch.zeros(5, 6, device=d)), ValueError,
     r"acc must have shape \(out, in\) = \(5, 7\)"),
    ("sumsq_outer_acc", lambda d, o: _sumsq(d, o, acc=torch.zeros(7, 5, device=d).t()), ValueError,
     "acc must be a contiguous 2-D float32 tensor"),
    ("sumsq_outer_acc", lambda d, o: _sumsq(d, o, g=torch.randn(3, 4, 5, device=d)), ValueError,
     r"g must be 4-D"),
    ("sumsq_outer_acc", lambda d, o: _sumsq(d, o, x=torch.randn(3, 4, 7, dtype=F64, device=d)), TypeError,
     "x must be float32, float16 or bfloat16"),
    ("sumsq_outer_acc", lambda d, o: _sumsq(d, o, x=torch.randn(2, 4, 7, device=d)), ValueError,
     "disagree on B or T"),
    ("sumsq_outer_acc", lambda d, o: _sumsq(d, o, g=torch.randn(3, 2, 4, 5, device=o)), ValueError,
     "g is on .* but acc is on"),
]
IDS = [f"{op}-{i}" for i, (op, *_) in enumerate(CASES)]

CHECKS = {"kmeans1d": checks.check_kmeans1d, "covariance_accumulate": checks.check_covariance_accumulate,
          "greedy_select": checks.check_greedy_select, "sumsq_outer_acc": checks.check_sumsq_outer_acc}


@pytest.mark.parametrize("op, build, exc, match", CASES, ids=IDS)
def test_shared_check_names_the_argument(op, build, exc, match):
    with pytest.raises(exc, match=match):
        CHECKS[op](*build("cpu", "meta"))
    with pytest.raises(exc, match=match):  # metadata only: meta tensors get the same answer
        CHECKS[op](*build("meta", "cpu"))


@pytest.mark.parametrize("op, build, exc, match", CASES, ids=IDS)
def test_op_raises_before_the_kernel(op, build, exc, match, devices):
    """The device's kernel and the fake (meta) kernel of every op."""
    with pytest.raises(exc, match=match):
        getattr(OPS, op)(*build(devices, "meta" if devices == "cpu" else "cpu"))
    with pytest.raises(exc, match=match):
        getattr(OPS, op)(*build("meta", devices))
    if devices == "cuda":
        torch.cuda.synchronize()  # nothing was launched that could have failed asynchronously


class _NoKernel:
    """Stands in for the compiled module: the CUDA branch of a kernel must not reach it."""

    has_cuda = True

    def __getattr__(self, name):
        raise AssertionError(f"popcomp._C.{name} reached with bad arguments")


def _kernels(op):
    """The CPU, CUDA and default (reference) kernel functions of an op, with their modules.
    (Importing the CUDA modules registers their kernels, also in a build without CUDA: there no
    CUDA tensor can reach them.)"""
    found = []
    for backend, name in (("cpu", f"{op}_cpu"), ("cuda", f"{op}_cuda"),
                          ("reference", f"{op}_default")):
        module = importlib.import_module(f"popcomp.ops.backends.{backend}.{op}")
        found.append((module, getattr(module, name)))
    return found


@pytest.mark.parametrize("op, build, exc, match", CASES, ids=IDS)
def test_every_kernel_checks_before_the_compiled_core(op, build, exc, match, monkeypatch):
    """The CUDA kernels (and the CPU ones) run the shared checks before any address reaches
    popcomp._C, whatever the build: here _C is a stand-in that fails if reached."""
    for module, kernel in _kernels(op):
        if hasattr(module, "compiled"):
            monkeypatch.setattr(module, "compiled", lambda: _NoKernel())
        with pytest.raises(exc, match=match):
            kernel(*build("cpu", "meta"))


def test_value_checks_of_the_direct_ops(devices):
    d = devices
    x = torch.randn(2, 5, device=d)
    with pytest.raises(ValueError, match="init_centers contains NaN or Inf"):
        OPS.kmeans1d(x, None, 2, 0.0, "lloyd", "given",
                     torch.tensor([[0.0, float("nan")]] * 2, dtype=F64, device=d), 10, 0.0, 0, "squared")
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(row 1\)"):
        OPS.kmeans1d(x, None, 2, 0.0, "lloyd", "kmeans++", None, 10, 0.0, 0, "squared")
    x = torch.randn(2, 6, device=d)
    x[0, 3] = float("inf")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(row 0\)"):
        OPS.kmeans1d(x, None, 2, 0.0, "exact", "kmeans++", None, 10, 0.0, 0, "squared")
    w = -torch.ones(2, 6, device=d)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        OPS.kmeans1d(torch.randn(2, 6, device=d), w, 2, 0.0, "exact", "kmeans++", None, 10, 0.0, 0, "squared")
    tau = torch.zeros(4, dtype=F64, device=d)
    with pytest.raises(ValueError, match="cov contains NaN or Inf"):
        OPS.greedy_select(torch.full((4, 4), float("nan"), dtype=F64, device=d), 2, tau, 1.0, None)
    with pytest.raises(ValueError, match="tau must be non-negative"):
        OPS.greedy_select(torch.eye(4, dtype=F64, device=d), 2, tau - 1, 1.0, None)
    with pytest.raises(ValueError, match="Z contains NaN or Inf"):
        OPS.greedy_select(torch.eye(4, dtype=F64, device=d), 2, tau, 0.5,
                          torch.full((2, 4), float("inf"), dtype=F64, device=d))


def test_cuda_non_contiguous_inputs(cuda_device):
    # non-contiguous inputs are fine (copied or read through their strides), as on CPU
    xt = torch.randn(8, 3, device=cuda_device).t()
    c_gpu = OPS.kmeans1d(xt, None, 2, 0.0, "exact", "kmeans++", None, 10, 0.0, 0, "squared")[0]
    c_cpu = OPS.kmeans1d(xt.cpu(), None, 2, 0.0, "exact", "kmeans++", None, 10, 0.0, 0, "squared")[0]
    torch.testing.assert_close(c_gpu.cpu(), c_cpu, rtol=1e-6, atol=1e-9)
    torch.cuda.synchronize()


def test_valid_direct_calls_still_work_on_every_device_and_meta(devices):
    for dev in (devices, "meta"):
        c, lab, cost, it = OPS.kmeans1d(*_km(dev, None, init="given",
                                             init_centers=torch.zeros(3, 2, dtype=F64, device=dev)))
        assert c.shape == (3, 2) and lab.shape == (3, 8)
        acc, count = torch.zeros(4, 4, device=dev), torch.zeros((), dtype=I64, device=dev)
        OPS.covariance_accumulate(torch.randn(2, 4, 5, device=dev), acc, count)  # (B, m, S)
        idx, obj = OPS.greedy_select(*_greedy(dev, None, k=0))
        assert idx.shape == (0,)
        OPS.sumsq_outer_acc(*_sumsq(dev, None))
        if dev != "meta":
            assert int(count) == 10


# ---- torch.library.opcheck of every op on every device ---------------------------------------
def _opcheck_args(d):
    g = torch.Generator().manual_seed(0)

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).to(d)

    S = rn(40, 9, dtype=F64)
    S = S.T @ S / 40
    tau = torch.full((9,), 0.1, dtype=F64, device=d)
    return {
        "kmeans1d": [
            (rn(3, 200), rn(3, 200).abs(), 4, 0.0, "exact", "kmeans++", None, 50, 0.0, 1, "squared"),
            (rn(3, 200), None, 4, 1.0, "lloyd", "linear", None, 50, 0.0, 1, "squared"),
            (rn(3, 200, dtype=F64), rn(3, 200).abs(), 3, 2.0, "lloyd", "given", rn(3, 3, dtype=F64), 50,
             0.0, 1, "linear"),
        ],
        "sumsq_outer_acc": [
            (torch.zeros(5, 7, device=d), rn(3, 2, 4, 5), rn(3, 4, 7)),
            (torch.zeros(6, 3, device=d), rn(4, 1, 1, 6), rn(4, 1, 3)),  # T = 1
        ],
        "covariance_accumulate": [
            (rn(20, 6), torch.zeros(6, 6, device=d), torch.zeros((), dtype=I64, device=d)),
            (rn(2, 6, 5, dtype=torch.float16), torch.zeros(6, 6, dtype=F64, device=d),
             torch.zeros((), dtype=I64, device=d)),
        ],
        "greedy_select": [
            (S, 4, tau, 1.0, None),
            (S.float(), 3, tau, 0.5, rn(5, 9)),
            (S, 0, tau, 1.0, None),
        ],
    }


@pytest.mark.parametrize("op", ["kmeans1d", "sumsq_outer_acc", "covariance_accumulate", "greedy_select"])
def test_opcheck_every_op(op, devices):
    for args in _opcheck_args(devices)[op]:
        torch.library.opcheck(getattr(OPS, op).default, args)


# ---- the codes popcomp reads from the compiled core --------------------------------------------
def test_fallback_codes_equal_the_compiled_ones():
    """Without a build popcomp falls back on its own copy of every code it reads from _C; each
    copy must equal the compiled value (a mismatch would make an unbuilt checkout accept, or
    word, something else than the kernels)."""
    fallbacks = _backend.core_fallbacks()
    assert {"dtype_codes", "kmeans_methods", "kmeans_inits", "kmeans_diameters", "kmeans_status",
            "kmeans_status_messages", "greedy_rel_guard"} <= set(fallbacks)
    if compiled() is None:
        pytest.skip("compiled core not built")
    for name, fallback in fallbacks.items():
        assert getattr(compiled(), name) == fallback, name
    assert checks.KMEANS_METHODS == compiled().kmeans_methods  # what popcomp uses is the core's
    assert _backend.DTYPE_CODES == {getattr(torch, n): c for n, c in compiled().dtype_codes.items()}
    assert checks.GREEDY_REL_GUARD[torch.float32] == 1e3 * torch.finfo(torch.float32).eps


_WITHOUT_CORE = textwrap.dedent("""
    import sys, importlib.abc

    class NoCore(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "popcomp._C":
                raise ImportError("the compiled core is not built")

    sys.meta_path.insert(0, NoCore())
    import torch, popcomp
    from popcomp.ops.backends.reference.greedy_select import greedy_select_reference

    assert popcomp._backend.compiled() is None and not popcomp.backends()["cpu"]["usable"]
    r = popcomp.kmeans1d(torch.tensor([0.0, 0.1, 5.0, 5.2]), 2, method="exact")
    assert torch.allclose(r.centers, torch.tensor([0.05, 5.1])) and r.labels.tolist() == [0, 0, 1, 1], r
    x = torch.randn(10, 4)
    acc, count = torch.zeros(4, 4), torch.zeros((), dtype=torch.int64)
    torch.ops.popcomp.covariance_accumulate(x, acc, count)
    assert int(count) == 10 and torch.allclose(acc, x.T @ x)
    acc = torch.zeros(5, 7)
    g, xs = torch.randn(3, 2, 4, 5), torch.randn(3, 4, 7)
    torch.ops.popcomp.sumsq_outer_acc(acc, g, xs)
    want = torch.einsum("brto,bti->broi", g, xs).square().sum((0, 1))
    assert torch.allclose(acc, want, rtol=1e-5, atol=1e-5)
    idx, obj = torch.ops.popcomp.greedy_select(torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)),
                                               2, torch.zeros(3, dtype=torch.float64), 1.0, None)
    assert idx.tolist() == [1, 2], idx
    try:
        popcomp.kmeans1d(torch.tensor([1.0, float("nan")]), 1)
    except ValueError as e:
        assert "x contains NaN or Inf" in str(e)
    else:
        raise AssertionError("NaN accepted")
    print("ok")
""")


def test_popcomp_runs_on_its_references_without_the_compiled_core():
    """An unbuilt checkout (no popcomp._C) imports, and every op runs on its reference, with the
    checks and codes of a build (the fallback copies)."""
    env = {**os.environ, "POPCOMP_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-c", _WITHOUT_CORE], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---- the raw bindings (popcomp._C) -----------------------------------------------------------
C = compiled()
needs_core = pytest.mark.skipif(C is None, reason="compiled core not built")


def _bound_names(fn):
    """The argument names of the binding popcomp._C.<fn>, from its pybind11 signature."""
    sig = getattr(C, fn).__doc__.splitlines()[0]
    return {p.split(":")[0].strip() for p in re.match(r"\w+\((.*)\) ->", sig).group(1).split(", ")}


class _Recorder:
    """Stands in for the compiled module: checks that every call names exactly the arguments
    of the real binding, and records it."""

    has_cuda = True

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            assert not args, f"{name} called with positional arguments"
            assert set(kwargs) == _bound_names(name), (name, set(kwargs) ^ _bound_names(name))
            self.calls.append(name)
            return (0, -1) if name == "kmeans1d_cpu" else 64
        return call


@needs_core
@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_kernels_call_the_core_by_its_argument_names(backend, monkeypatch):
    """The CPU and CUDA kernels of every op call their entry points with keyword arguments that
    are exactly the bound ones -- the CUDA kernels too, without a GPU (the stand-in core touches
    no memory)."""
    if backend == "cuda" and not C.has_cuda:
        pytest.skip("CUDA bindings not built")
    args = {
        "kmeans1d": (torch.randn(3, 20), torch.rand(3, 20), 2, 0.0, "lloyd", "given",
                     torch.zeros(3, 2, dtype=F64), 5, 0.0, 1, "squared"),
        "sumsq_outer_acc": (torch.zeros(5, 7), torch.randn(3, 2, 4, 5), torch.randn(3, 4, 7)),
        "covariance_accumulate": (torch.randn(2, 4, 5), torch.zeros(4, 4), torch.zeros((), dtype=I64)),
        "greedy_select": (torch.eye(4, dtype=F64), 2, torch.zeros(4, dtype=F64), 0.5,
                          torch.randn(3, 4, dtype=F64)),
    }
    rec = _Recorder()
    for op, op_args in args.items():
        module = importlib.import_module(f"popcomp.ops.backends.{backend}.{op}")
        monkeypatch.setattr(module, "compiled", lambda: rec)
        if backend == "cuda":
            monkeypatch.setattr(module, "cuda_stream_args", lambda t: (0, 0))
            if hasattr(module, "cuda_workspace"):
                monkeypatch.setattr(module, "cuda_workspace",
                                    lambda n, device: torch.empty(int(n), dtype=torch.uint8))
        getattr(module, f"{op}_{backend}")(*op_args)
    want = {"cpu": ["kmeans1d_cpu", "sumsq_outer_cpu", "covariance_accumulate_cpu", "greedy_select_cpu"],
            "cuda": ["kmeans1d_cuda_workspace", "kmeans1d_cuda", "sumsq_outer_cuda",
                     "covariance_accumulate_cuda_workspace", "covariance_accumulate_cuda",
                     "greedy_select_cuda_workspace", "greedy_select_cuda"]}[backend]
    assert rec.calls == want


@needs_core
@pytest.mark.parametrize("fn, args, match", [
    # kmeans1d_cpu(x, w, x_dtype, w_dtype, rows, n, k, beta, method, init, diameter, max_iter,
    #              tol, seed, init_centers, centers, labels, cost, n_iter, num_threads)
    ("kmeans1d_cpu", (0, 0, 1, 1, 2, 3, 2, 0.0, 0, 0, 0, 10, 0.0, 0, 0, 0, 0, 0, 0, 1), "x is a null address"),
    ("kmeans1d_cpu", (1, 0, 9, 1, 2, 3, 2, 0.0, 0, 0, 0, 10, 0.0, 0, 0, 1, 1, 1, 1, 1), "x_dtype must be a dtype code"),
    ("kmeans1d_cpu", (1, 0, 1, 1, -2, 3, 2, 0.0, 0, 0, 0, 10, 0.0, 0, 0, 1, 1, 1, 1, 1), "rows must be >= 0"),
    ("kmeans1d_cpu", (1, 0, 1, 1, 2, 3, 0, 0.0, 0, 0, 0, 10, 0.0, 0, 0, 1, 1, 1, 1, 1), "k must be >= 1"),
    ("kmeans1d_cpu", (1, 0, 1, 1, 2, 3, 2, float("nan"), 0, 0, 0, 10, 0.0, 0, 0, 1, 1, 1, 1, 1), "beta must be finite"),
    ("kmeans1d_cpu", (1, 0, 1, 1, 2, 3, 2, 0.0, 5, 0, 0, 10, 0.0, 0, 0, 1, 1, 1, 1, 1), "method must be a code"),
    ("kmeans1d_cpu", (1, 0, 1, 1, 2, 3, 2, 0.0, 0, 3, 0, 10, 0.0, 0, 0, 1, 1, 1, 1, 1), "init_centers"),
    ("kmeans1d_cpu", (1, 0, 1, 1, 2, 3, 2, 0.0, 0, 0, 2, 10, 0.0, 0, 0, 1, 1, 1, 1, 1), "diameter must be a code"),
    ("kmeans1d_cpu", (1, 0, 1, 1, 2, 3, 2, 0.0, 0, 0, 0, -1, 0.0, 0, 0, 1, 1, 1, 1, 1), "max_iter must be >= 0"),
    # sumsq_outer_cpu(g, x, acc, B, R, T, out, in, g_strides, x_strides, g_dtype, x_dtype, threads)
    ("sumsq_outer_cpu", (1, 1, 1, 1, 1, 1, 1, 1, (1, 1, 1), (1, 1, 1), 1, 1, 1), "g_strides must hold 4"),
    ("sumsq_outer_cpu", (1, 1, 1, 1, 1, 1, 1, 1, (1, 1, 1, 1), (1, 1), 1, 1, 1), "x_strides must hold 3"),
    ("sumsq_outer_cpu", (1, 1, 1, 1, 1, 1, 1, 1, (1, 1, 1, 1), (1, 1, 1), 0, 1, 1), "g_dtype must be a dtype code"),
    ("sumsq_outer_cpu", (1, 1, 0, 1, 1, 1, 1, 1, (1, 1, 1, 1), (1, 1, 1), 1, 1, 1), "acc is a null address"),
    ("sumsq_outer_cpu", (1, 1, 1, -1, 1, 1, 1, 1, (1, 1, 1, 1), (1, 1, 1), 1, 1, 1), "B must be >= 0"),
    # covariance_accumulate_cpu(x, x_dtype, B, S, m, sB, sS, sm, acc, acc_dtype, threads)
    ("covariance_accumulate_cpu", (1, 1, 1, 1, 1, 0, 1, 1, 1, 2, 1), "acc_dtype must be a dtype code"),
    ("covariance_accumulate_cpu", (0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1), "x is a null address"),
    ("covariance_accumulate_cpu", (1, 1, 1, -1, 1, 0, 1, 1, 1, 1, 1), "S must be >= 0"),
    # greedy_select_cpu(cov, M, dtype, m, k, tau, n0, L0, rel_guard, idx, obj, threads)
    ("greedy_select_cpu", (1, 0, 0, 3, 4, 1, 1, 1, 1e-3, 1, 1, 1), r"k must be <= m \(3\)"),
    ("greedy_select_cpu", (1, 0, 2, 3, 2, 1, 1, 1, 1e-3, 1, 1, 1), "dtype must be a dtype code"),
    ("greedy_select_cpu", (1, 0, 0, 3, 2, 0, 1, 1, 1e-3, 1, 1, 1), "tau is a null address"),
    ("greedy_select_cpu", (1, 0, 0, 3, 2, 1, 1, 1, -1.0, 1, 1, 1), "rel_guard must be finite and >= 0"),
])
def test_bindings_check_their_arguments(fn, args, match):
    with pytest.raises(ValueError, match=f"{fn}: .*{match}"):
        getattr(C, fn)(*args)


@needs_core
@pytest.mark.skipif(C is None or not C.has_cuda, reason="CUDA bindings not built")
@pytest.mark.parametrize("fn, args, match", [
    ("kmeans1d_cuda", (0, 0, 1, 1, 2, 3, 2, 0.0, 0, 0, 0, 10, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
     "x is a null address"),
    ("kmeans1d_cuda", (1, 0, 1, 1, 2, 3, 2, 0.0, 0, 0, 0, 10, 0.0, 0, 0, 1, 1, 1, 1, 0, 0, -1, 0),
     "device must be a CUDA device index"),
    ("kmeans1d_cuda", (1, 0, 1, 1, 2, 3, 2, 0.0, 0, 0, 0, 10, 0.0, 0, 0, 1, 1, 1, 1, 0, 64, 0, 0),
     "workspace is a null address"),
    ("kmeans1d_cuda_workspace", (2, 3, 2, 4, 1, 0), "method must be a code"),
    ("sumsq_outer_cuda", (1, 1, 1, 1, 1, 1, 1, 1, (1, 1, 1), (1, 1, 1), 1, 1, 0, 0), "g_strides must hold 4"),
    ("covariance_accumulate_cuda", (1, 1, 1, 1, 1, 0, 1, 1, 1, 3, 0, 0, 0, 0), "acc_dtype must be a dtype code"),
    ("covariance_accumulate_cuda", (1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 16, 0, 0), "workspace is a null address"),
    ("greedy_select_cuda", (1, 0, 0, 3, 4, 1, 1, 1, 1e-3, 1, 1, 0, 0, 0, 0), r"k must be <= m \(3\)"),
    ("greedy_select_cuda", (1, 0, 0, 3, 2, 1, 1, 1, 1e-3, 1, 1, 0, 0, 0, 0), "workspace too small"),
    ("greedy_select_cuda_workspace", (3, 3, 2), "dtype must be a dtype code"),
])
def test_cuda_bindings_check_their_arguments(fn, args, match):
    with pytest.raises(ValueError, match=f"{fn}: .*{match}"):
        getattr(C, fn)(*args)
