"""Property-based fuzzing of every public op (hypothesis, derandomized, a small budget each):
never a crash, ValueError/TypeError for bad input, finite outputs for good input, inputs
unmodified, and agreement with the reference implementation on small inputs."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import popcomp  # noqa: E402
from popcomp.ops.backends.reference.covariance_accumulate import covariance_accumulate_reference  # noqa: E402
from popcomp.ops.backends.reference.greedy_select import greedy_select_reference  # noqa: E402
from popcomp.ops.backends.reference.palettized import (  # noqa: E402
    palettized_decode_reference, palettized_linear_reference)
from popcomp.ops.backends.reference.sumsq_outer_acc import sumsq_outer_acc_reference  # noqa: E402
from popcomp.quantize.packing import pack_rows  # noqa: E402
from popcomp.spectral import covariance_accumulate, greedy_select  # noqa: E402
from oracles import kmeans_brute_force_cost

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# any double, non-finite and extreme ones included
ANY = st.floats(allow_nan=True, allow_infinity=True, width=64)
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
MODERATE = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=64)
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])


# ---- kmeans1d -------------------------------------------------------------------------------

@FUZZ
@given(vals=st.lists(ANY, min_size=1, max_size=24), wts=st.one_of(st.none(), st.lists(ANY, min_size=24, max_size=24)),
       k=st.integers(-2, 8), dtype=DTYPES, method=st.sampled_from(["lloyd", "exact"]),
       beta=st.one_of(st.just(0.0), ANY), rows=st.integers(1, 3))
def test_fuzz_kmeans1d_never_crashes(vals, wts, k, dtype, method, beta, rows):
    n = len(vals)
    x = torch.tensor(vals, dtype=torch.float64).to(dtype).repeat(rows, 1)
    w = None if wts is None else torch.tensor(wts[:n], dtype=torch.float64).to(dtype).repeat(rows, 1)
    x0, w0 = x.clone(), None if w is None else w.clone()
    try:
        r = popcomp.kmeans1d(x, k, w, beta=beta, method=method, seed=0, max_iter=50)
    except (ValueError, TypeError):
        event("refused")
        return
    finally:
        assert torch.equal(x.nan_to_num(), x0.nan_to_num())
        assert w is None or torch.equal(w.nan_to_num(), w0.nan_to_num())
    # accepted: the input is valid, the outputs are meaningful
    assert torch.isfinite(x.double()).all() and k >= 1 and math.isfinite(beta) and beta >= 0
    assert r.centers.shape == (rows, k) and r.labels.shape == x.shape
    assert torch.isfinite(r.centers).all()
    assert not torch.isnan(r.cost).any() and (r.cost >= 0).all()
    assert ((r.labels >= 0) & (r.labels < k)).all()
    assert (r.centers[:, 1:] >= r.centers[:, :-1]).all()


@FUZZ
@given(vals=st.lists(MODERATE, min_size=1, max_size=8), wts=st.lists(st.floats(0.0, 1e3), min_size=8, max_size=8),
       k=st.integers(1, 4), scale_exp=st.integers(-300, 300))
def test_fuzz_kmeans1d_exact_matches_brute_force(vals, wts, k, scale_exp):
    n = len(vals)
    ww = [w + 1e-3 for w in wts[:n]]
    x = torch.tensor(vals, dtype=torch.float64)
    w = torch.tensor(ww, dtype=torch.float64)
    s = 2.0 ** scale_exp  # a power of two: the scaled weights are exact
    r = popcomp.kmeans1d(x, k, w * s, method="exact")
    ref = kmeans_brute_force_cost(vals, ww, k)
    scale = sum(ww) * max(1.0, max(abs(v) for v in vals)) ** 2
    assert float(r.cost) / s == pytest.approx(ref, rel=1e-9, abs=1e-12 * scale)
    # nearest-center labels
    d = (x[:, None] - r.centers[None, :]).abs()
    assert (d.gather(1, r.labels.long()[:, None]).squeeze(1) <= d.min(1).values).all()


# ---- covariance_accumulate ------------------------------------------------------------------

@FUZZ
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), dtype=DTYPES,
       acc_dtype=st.sampled_from([torch.float32, torch.float64]),
       channel_dim=st.one_of(st.none(), st.integers(-5, 5), st.just("1")), seed=st.integers(0, 2**16))
def test_fuzz_covariance_accumulate(shape, dtype, acc_dtype, channel_dim, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    x0 = x.clone()
    try:
        acc, cnt = covariance_accumulate(x, dtype=acc_dtype, channel_dim=channel_dim)
    except (ValueError, TypeError):
        event("refused")
        return
    finally:
        assert torch.equal(x, x0)
    assert torch.isfinite(acc).all()
    m = acc.shape[0]
    if m == 0:
        assert acc.shape == (0, 0)
        return
    # the reference on the (N, m) samples
    cd = 1 if channel_dim is None else channel_dim % x.dim()
    xs = x.movedim(cd, -1).reshape(-1, m)
    ref = torch.zeros(m, m, dtype=torch.float64)
    rc = torch.zeros((), dtype=torch.int64)
    covariance_accumulate_reference(xs, ref, rc)
    assert int(cnt) == int(rc) == xs.shape[0]
    tol = 1e-3 if acc_dtype == torch.float32 or dtype != torch.float64 else 1e-10
    torch.testing.assert_close(acc.double(), ref, rtol=tol, atol=tol)


# ---- greedy_select --------------------------------------------------------------------------

@FUZZ
@given(m=st.integers(1, 7), k=st.integers(-1, 8), theta=st.one_of(st.floats(0, 1), ANY),
       tau=st.one_of(st.none(), st.floats(0, 10), ANY), scale_exp=st.integers(-300, 300),
       with_z=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_fuzz_greedy_select(m, k, theta, tau, scale_exp, with_z, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * m + 2, m, generator=g, dtype=torch.float64)
    s = 2.0 ** (scale_exp if dtype == torch.float64 else scale_exp // 10)
    cov = (X.T @ X / X.shape[0] * s).to(dtype)
    Z = torch.randn(3, m, generator=g, dtype=dtype) if with_z else None
    tau_s = None if tau is None else tau * s if math.isfinite(tau) else tau
    cov0 = cov.clone()
    try:
        r = greedy_select(cov, k, tau=tau_s, theta=theta, Z=Z)
    except (ValueError, TypeError):
        event("refused")
        return
    finally:
        assert torch.equal(cov, cov0)
    assert 1 <= k <= m
    assert sorted(set(r.indices.tolist())) == sorted(r.indices.tolist())
    assert ((r.indices >= 0) & (r.indices < m)).all()
    assert torch.isfinite(r.objective).all()
    assert (r.objective[1:] <= r.objective[:-1] * (1 + 1e-6) + 1e-300).all()
    if dtype == torch.float64 and tau_s is not None and tau >= 1e-3:
        # the float64 reference (well-conditioned problems: no near-ties)
        t = torch.full((m,), tau_s, dtype=torch.float64)
        _, obj = greedy_select_reference(cov, k, t, theta, Z)
        torch.testing.assert_close(r.objective[-1], obj[-1], rtol=1e-6, atol=1e-12 * float(cov.trace()))


# ---- sumsq_outer_acc ------------------------------------------------------------------------

@FUZZ
@given(B=st.integers(0, 3), R=st.integers(0, 3), T=st.integers(0, 4), O=st.integers(0, 5), In=st.integers(0, 5),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       bad=st.sampled_from([None, "acc_shape", "acc_dtype", "x_shape"]), seed=st.integers(0, 2**16))
def test_fuzz_sumsq_outer_acc(B, R, T, O, In, dtype, bad, seed):
    g_ = torch.Generator().manual_seed(seed)
    g = torch.randn(B, R, T, O, generator=g_).to(dtype)
    x = torch.randn(B, T, In, generator=g_).to(dtype)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc = torch.zeros(O, In, dtype=acc_dtype)
    if bad == "acc_shape":
        acc = torch.zeros(O + 1, In, dtype=acc_dtype)
    elif bad == "acc_dtype":
        acc = torch.zeros(O, In, dtype=torch.int32)
    elif bad == "x_shape":
        x = torch.randn(B, T + 1, In).to(dtype)
    g0, x0 = g.clone(), x.clone()
    try:
        torch.ops.popcomp.sumsq_outer_acc(acc, g, x)
    except (ValueError, TypeError, RuntimeError) as e:
        # torch.ops re-raises the kernel's ValueError as is; nothing else may escape
        assert bad is not None or isinstance(e, (ValueError, TypeError)), e
        event("refused")
        return
    finally:
        assert torch.equal(g, g0) and torch.equal(x, x0)
    assert bad is None
    assert torch.isfinite(acc).all()
    ref = torch.zeros(O, In, dtype=acc_dtype)
    sumsq_outer_acc_reference(ref, g, x)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(acc, ref, rtol=tol, atol=tol)


# ---- palettized ops -------------------------------------------------------------------------

@FUZZ
@given(rows=st.integers(1, 5), inf=st.integers(1, 40), bits=st.integers(1, 8), per_row=st.booleans(),
       batch=st.integers(0, 3), bad=st.sampled_from([None, "bits", "in_features", "codebook"]),
       seed=st.integers(0, 2**16))
def test_fuzz_palettized_ops(rows, inf, bits, per_row, batch, bad, seed):
    g = torch.Generator().manual_seed(seed)
    K = 1 << bits
    idx = torch.randint(0, K, (rows, inf), generator=g)
    packed = pack_rows(idx, bits)
    codebook = torch.randn(rows if per_row else 1, K, generator=g)
    x = torch.randn(batch, inf, generator=g)
    b, fi = bits, inf
    if bad == "bits":
        b = 9 if bits < 8 else 0
    elif bad == "in_features":
        fi = inf + 1000
    elif bad == "codebook":
        codebook = codebook[:, : max(1, K // 2)] if K > 1 else codebook.to(torch.int32)
    p0, c0 = packed.clone(), codebook.clone()
    try:
        w = torch.ops.popcomp.palettized_decode(packed, codebook, b, fi, 0, torch.float32)
        y = torch.ops.popcomp.palettized_linear(x, packed, codebook, None, b, fi, 0)
    except (ValueError, TypeError):
        assert bad is not None
        event("refused")
        return
    finally:
        assert torch.equal(packed, p0) and torch.equal(codebook, c0)
    if bad == "codebook" and K == 2:  # (half of a 2-entry codebook is still valid)
        pass
    ref = palettized_decode_reference(packed, codebook, b, fi, 0, torch.float32)
    assert torch.equal(w, ref)
    torch.testing.assert_close(y, palettized_linear_reference(x, packed, codebook, None, b, fi, 0),
                               rtol=1e-5, atol=1e-5)
