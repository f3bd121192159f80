"""Tests of popcomp.kmeans1d against independent oracles: brute force over all contiguous
partitions, the pure-torch float64 reference, ckwrap (Ckmeans.1d.dp) and closed forms, on every
device (the `devices` fixture); and of the CUDA kernel against the CPU kernel (same seed, same
inputs)."""

import numpy as np
import pytest
import torch

import popcomp
from popcomp.ops.backends.reference.kmeans1d import kmeans1d_reference
from popcomp.ops.checks import check_kmeans1d_values
from oracles import (kmeans_brute_force_cost, kmeans_brute_force_cost_exact, kmeans_dp_stable_labels,
                     kmeans_labels_cost_exact)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def op(x, w, k, beta=0.0, method="lloyd", init="kmeans++", init_centers=None, max_iter=300,
       tol=0.0, seed=1234, diameter="squared"):
    return torch.ops.popcomp.kmeans1d(x, w, k, beta, method, init, init_centers, max_iter, tol,
                                      seed, diameter)


def data(rows, n, dtype, seed, weighted=True, zero_frac=0.0, levels=None):
    g = torch.Generator().manual_seed(seed)
    if levels is not None:
        x = torch.randint(-levels, levels + 1, (rows, n), generator=g).double() / 4
    else:
        x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    w = None
    if weighted:
        w = torch.rand(rows, n, generator=g, dtype=torch.float64) + 0.01
        if zero_frac > 0:
            w[torch.rand(rows, n, generator=g) < zero_frac] = 0.0
            w[:, 0] = 1.0
        w = w.to(torch.float32)
    return x, w


def objective(x, w, centers, labels, beta=0.0, diameter="squared"):
    x = x.double()
    w = torch.ones_like(x) if w is None else w.double()
    c = centers.double()
    d = float(c.max() - c.min())
    pen = beta * d * d if diameter == "squared" else beta * d
    return float((w * (x - c[labels.long()]) ** 2).sum()) + pen


def ckwrap_cost(x, w, k):
    """Cost of ckwrap.ckmeans's answer (float64 arrays in), from its labels; skips without it."""
    ckwrap = pytest.importorskip("ckwrap")
    ref = ckwrap.ckmeans(np.asarray(x, dtype=np.float64), k, weights=np.asarray(w, dtype=np.float64))
    return objective(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(w, dtype=torch.float64),
                     torch.from_numpy(np.asarray(ref.centers, dtype=np.float64)),
                     torch.from_numpy(np.asarray(ref.labels)))


def assert_cost_matches(ours, ref_cost, rel):
    """Equal to ckwrap's cost to rel, and never above it beyond rounding."""
    assert float(ours) == pytest.approx(float(ref_cost), rel=rel)
    assert float(ours) <= float(ref_cost) * (1 + 1e-12)


@pytest.mark.parametrize("trial", range(60))
def test_exact_is_globally_optimal_brute_force(trial, devices):
    g = torch.Generator().manual_seed(trial)
    n = int(torch.randint(1, 10, (1,), generator=g))
    k = int(torch.randint(1, 5, (1,), generator=g))
    if trial % 3 == 0:  # many ties
        x = torch.randint(-3, 4, (n,), generator=g).double()
    else:
        x = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.05
    if trial % 4 == 1 and n > 1:
        w[0] = 0.0  # a zero-weight value
    r = popcomp.kmeans1d(x.to(devices), k, w.to(devices), method="exact")
    r = popcomp.KMeansResult(*(t.cpu() for t in (r.centers, r.labels, r.cost, r.n_iter)))
    bf = kmeans_brute_force_cost(x, w, k)
    assert float(r.cost) == pytest.approx(bf, rel=1e-10, abs=1e-12)
    # the reported cost is the objective of the returned centers and labels
    assert float(r.cost) == pytest.approx(objective(x, w, r.centers, r.labels), rel=1e-12, abs=1e-12)
    assert torch.all(r.centers[1:] >= r.centers[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["exact", "lloyd"])
@pytest.mark.parametrize("beta,diameter", [(0.0, "squared"), (3.0, "squared"), (40.0, "linear")])
def test_matches_float64_reference(dtype, method, beta, diameter):
    x = torch.randn(3, 2000).to(dtype)
    w = torch.rand(3, 2000, dtype=torch.float32)
    r = popcomp.kmeans1d(x, 7, w, method=method, beta=beta, init="quantile", diameter=diameter)
    c, lab, cost, it = kmeans1d_reference(
        x, w, 7, beta, method, "quantile", None, 300, 0.0, 0, diameter
    )
    torch.testing.assert_close(r.centers.double(), c, rtol=1e-6 if dtype != torch.float64 else 1e-9, atol=1e-7)
    assert torch.equal(r.labels, lab)
    torch.testing.assert_close(r.cost, cost, rtol=1e-9, atol=1e-9)
    assert torch.equal(r.n_iter, it)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_histogram_path_matches_reference(dtype):
    x = (torch.randn(40000) * 3).to(dtype)  # n >= 32768: weighted 65536-bin histogram
    w = torch.rand(40000, dtype=torch.float64)
    for method in ["exact", "lloyd"]:
        r = popcomp.kmeans1d(x, 16, w, method=method, init="linear")
        c, lab, cost, it = kmeans1d_reference(
            x[None], w[None], 16, 0.0, method, "linear", None, 300, 0.0, 0, "squared"
        )
        assert torch.equal(r.labels, lab[0])
        torch.testing.assert_close(r.cost, cost[0], rtol=1e-9, atol=0)


def test_exact_matches_ckwrap():
    rng = np.random.default_rng(3)
    for n, k in [(5000, 16), (20000, 5), (3000, 2)]:
        x = rng.standard_normal(n)
        w = rng.random(n) + 0.1
        ref_cost = ckwrap_cost(x, w, k)
        r = popcomp.kmeans1d(torch.from_numpy(x), k, torch.from_numpy(w), method="exact")
        assert_cost_matches(r.cost, ref_cost, rel=1e-8)


@pytest.mark.parametrize("method", ["exact", "lloyd"])
def test_large_problem_paths_agree_across_dtypes(method):
    """Above 2^18 values the CPU kernel takes other paths: 32-bit weights travel with their
    keys through the sort, float64 weights are gathered into sorted order, float64 values sort
    as 64-bit keys, labels come from a search of the midpoints rather than the sort
    permutation. The same numbers in any pairing of float32/float64 storage must give the
    same answer; `exact` also matches ckwrap."""
    rng = np.random.default_rng(21)
    n, k = 300_000, 12
    x32 = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    w32 = torch.from_numpy((rng.random(n) * (rng.random(n) > 0.05)).astype(np.float32))
    runs = {}
    for xd in (torch.float32, torch.float64):
        for wd in (torch.float32, torch.float64):
            runs[xd, wd] = popcomp.kmeans1d(x32.to(xd), k, w32.to(wd), method=method, seed=3)
    base = runs[torch.float32, torch.float32]
    for r in runs.values():
        assert torch.equal(r.labels, base.labels)
        # centers come back in the values' dtype: the same float64 centers, rounded
        assert torch.equal(r.centers.float(), base.centers)
        assert float(r.cost) == pytest.approx(float(base.cost), rel=1e-12)
    # the cost is that of the labels
    x64, w64 = x32.double(), w32.double()
    assert float(base.cost) == pytest.approx(
        float(objective(x64, w64, base.centers.double(), base.labels)), rel=1e-9)
    if method == "exact":
        assert_cost_matches(base.cost, ckwrap_cost(x64.numpy(), w64.numpy(), k), rel=1e-9)


def test_exact_small_demand_problems_match_ckwrap():
    """From 2048 distinct values the DP runs in demand mode (bands of rows guided by a coarse
    DP): sizes at and just above that, with per-row codebooks' sizes among them."""
    rng = np.random.default_rng(5)
    for n, k in [(2048, 16), (2600, 3), (4096, 16), (4096, 40), (9000, 33)]:
        for x in (rng.standard_normal(n), rng.standard_cauchy(n),
                  rng.normal(0, 10, 6)[rng.integers(0, 6, n)] + 0.05 * rng.standard_normal(n)):
            w = rng.random(n) + 0.01
            r = popcomp.kmeans1d(torch.from_numpy(x), k, torch.from_numpy(w), method="exact")
            assert_cost_matches(r.cost, ckwrap_cost(x, w, k), rel=1e-9)


def test_exact_wide_rows_match_ckwrap():
    """Problems large enough for the lower-bound blocks of wide DP rows (>= 2048 columns), for
    the split across threads and for the demand mode (rows the answer cannot use are skipped,
    guided by a coarse DP; tight mixtures make that guess fail and take another way): normal
    values, gapped clusters (where a row's values are far from unimodal), heavy tails with
    outliers in clusters of their own, tight mixtures and repeated values."""
    pytest.importorskip("ckwrap")
    rng = np.random.default_rng(11)
    n = 60000
    gapped = np.concatenate([rng.normal(c, 0.05, n // 6) for c in (-9, -4, -3.5, 0, 6, 6.2)])
    heavy = rng.standard_t(1.5, n)
    repeats = np.round(rng.standard_normal(n) * 50) / 10  # about 600 distinct values
    cauchy = rng.standard_cauchy(n)
    centres = rng.normal(0, 10, 9)
    tight = centres[rng.integers(0, 9, n)] + rng.normal(0, 0.1, n)
    cases = [(rng.standard_normal(n), 12), (gapped, 12), (heavy, 16), (repeats, 9),
             (cauchy, 33), (tight, 16), (tight, 40)]
    for x, k in cases:
        w = rng.random(x.size) + 0.01
        w[rng.random(x.size) < 0.05] = 0.0
        ref_cost = ckwrap_cost(x, w, k)
        before = torch.get_num_threads()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                r = popcomp.kmeans1d(torch.from_numpy(x), k, torch.from_numpy(w), method="exact")
            finally:
                torch.set_num_threads(before)
            assert_cost_matches(r.cost, ref_cost, rel=1e-9)


@pytest.mark.parametrize("beta,diameter", [(0.0, "squared"), (5.0, "squared"), (2.0, "linear")])
def test_lloyd_objective_is_monotone(beta, diameter):
    x = torch.randn(5000, dtype=torch.float64) ** 3
    w = torch.rand(5000, dtype=torch.float64)
    init = torch.linspace(-2, 2, 9, dtype=torch.float64)
    costs = [
        float(popcomp.kmeans1d(x, 9, w, beta=beta, init=init, max_iter=t, diameter=diameter).cost)
        for t in range(0, 40)
    ]
    assert all(b <= a * (1 + 1e-12) + 1e-12 for a, b in zip(costs, costs[1:])), costs
    assert costs[-1] < costs[0]


def test_drhw_center_update_is_exact():
    """One DRHW iteration from given centers equals the float64 reference whose center update
    evaluates the true objective for every clamp interval; the update also beats a fine grid."""
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        n, k = 300, int(torch.randint(2, 7, (1,), generator=g))
        x = torch.randn(n, generator=g, dtype=torch.float64) * (1 + trial)
        w = torch.rand(n, generator=g, dtype=torch.float64)
        init = torch.sort(x[torch.randperm(n, generator=g)[:k]]).values
        beta = float(10 ** torch.empty(1).uniform_(-2, 3, generator=g))
        for diameter in ["squared", "linear"]:
            r = popcomp.kmeans1d(x, k, w, beta=beta, init=init, max_iter=1, diameter=diameter)
            c, lab, cost, _ = kmeans1d_reference(
                x[None], w[None], k, beta, "lloyd", "given", init[None], 1, 0.0, 0, diameter
            )
            torch.testing.assert_close(r.cost, cost[0], rtol=1e-9, atol=1e-9)
            # no (a, b) clamp interval does better for the assignment of the first step
            mids = 0.5 * (init[1:] + init[:-1])
            lab0 = torch.searchsorted(mids, x)
            H = torch.zeros(k, dtype=torch.float64).index_add_(0, lab0, w)
            S = torch.zeros(k, dtype=torch.float64).index_add_(0, lab0, w * x)
            m = (S / H)[H > 0]
            Hs = H[H > 0]
            grid = torch.linspace(float(m.min()), float(m.max()), 120, dtype=torch.float64)
            A, B = torch.meshgrid(grid, grid, indexing="ij")
            ok = A <= B
            cc = torch.minimum(torch.maximum(m[None, None, :], A[..., None]), B[..., None])
            d = cc.max(-1).values - cc.min(-1).values
            pen = beta * d * d if diameter == "squared" else beta * d
            f = (Hs * (cc - m) ** 2).sum(-1) + pen
            best_grid = float(f[ok].min())
            cu = torch.clamp(r.centers, float(r.centers.min()), float(r.centers.max()))
            f_ours = float((Hs * (torch.clamp(m, float(cu.min()), float(cu.max())) - m) ** 2).sum())
            dd = float(cu.max() - cu.min())
            f_ours += beta * dd * dd if diameter == "squared" else beta * dd
            assert f_ours <= best_grid * (1 + 1e-9) + 1e-9


def test_large_beta_collapses_to_weighted_mean():
    x = torch.randn(1000, dtype=torch.float64)
    w = torch.rand(1000, dtype=torch.float64)
    mean = float((w * x).sum() / w.sum())
    r = popcomp.kmeans1d(x, 4, w, beta=1e6, diameter="linear", method="exact")
    torch.testing.assert_close(r.centers, torch.full((4,), mean, dtype=torch.float64))
    r2 = popcomp.kmeans1d(x, 4, w, beta=1e12, method="exact")
    assert float(r2.centers.max() - r2.centers.min()) < 1e-6


def test_batched_equals_loop():
    x = torch.randn(6, 700)
    w = torch.rand(6, 700)
    for kwargs in [dict(method="exact", beta=0.5), dict(method="exact"), dict(init="quantile"),
                   dict(init="linear", beta=2.0, diameter="linear")]:
        rb = popcomp.kmeans1d(x, 5, w, **kwargs)
        for i in range(6):
            ri = popcomp.kmeans1d(x[i], 5, w[i], **kwargs)
            torch.testing.assert_close(ri.centers, rb.centers[i])
            assert torch.equal(ri.labels, rb.labels[i])
            torch.testing.assert_close(ri.cost, rb.cost[i])
            assert int(ri.n_iter) == int(rb.n_iter[i])


def test_seed_reproducible():
    x = torch.randn(3000)
    a = popcomp.kmeans1d(x, 8, seed=5)
    b = popcomp.kmeans1d(x, 8, seed=5)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("method", ["exact", "lloyd"])
def test_k1_is_weighted_mean(method, devices):
    x = torch.randn(500, dtype=torch.float64, device=devices)
    w = torch.rand(500, dtype=torch.float64, device=devices)
    r = popcomp.kmeans1d(x, 1, w, method=method)
    mean = (w * x).sum() / w.sum()
    torch.testing.assert_close(r.centers, mean.reshape(1))
    torch.testing.assert_close(r.cost, (w * (x - mean) ** 2).sum())
    assert torch.all(r.labels == 0)


@pytest.mark.parametrize("method", ["exact", "lloyd"])
def test_k_at_least_distinct_values(method, devices):
    x = torch.tensor([3.0, 1.0, 2.0, 1.0, 3.0], device=devices)
    r = popcomp.kmeans1d(x, 5, method=method)
    assert float(r.cost) == 0.0
    torch.testing.assert_close(r.centers, torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0], device=devices))
    torch.testing.assert_close(r.dequantize(), x)


def test_all_values_equal(devices):
    x = torch.full((100,), 0.25, device=devices)
    for method in ["exact", "lloyd"]:
        r = popcomp.kmeans1d(x, 4, method=method, beta=1.0)
        assert float(r.cost) == 0.0
        assert torch.all(r.centers == 0.25)


def test_zero_weight_values_get_labels_but_do_not_move_centers():
    x = torch.randn(400, dtype=torch.float64)
    w = torch.rand(400, dtype=torch.float64) + 0.1
    extra = torch.tensor([10.0, -7.0, 0.3], dtype=torch.float64)
    xa = torch.cat([x, extra])
    wa = torch.cat([w, torch.zeros(3, dtype=torch.float64)])
    r = popcomp.kmeans1d(x, 4, w, method="exact")
    ra = popcomp.kmeans1d(xa, 4, wa, method="exact")
    torch.testing.assert_close(ra.centers, r.centers)
    torch.testing.assert_close(ra.cost, r.cost)
    # each zero-weight value is labelled with its nearest center
    for v, lab in zip(extra, ra.labels[-3:]):
        assert int(lab) == int(torch.argmin((ra.centers - v).abs()))


def test_inputs_not_modified_and_noncontiguous(devices):
    x = torch.randn(64, 50, device=devices).t()  # non-contiguous (50, 64)
    w = torch.rand(64, 50, device=devices).t()
    x0, w0 = x.clone(), w.clone()
    r = popcomp.kmeans1d(x, 4, w, method="exact")
    assert torch.equal(x, x0) and torch.equal(w, w0)
    r2 = popcomp.kmeans1d(x.contiguous(), 4, w.contiguous(), method="exact")
    assert torch.equal(r.labels, r2.labels)
    assert r.centers.shape == (50, 4) and r.labels.shape == (50, 64) and r.cost.shape == (50,)


def test_result_dtypes_and_shapes(devices):
    for dt in DTYPES:
        r = popcomp.kmeans1d(torch.randn(100, device=devices).to(dt), 3)
        assert r.centers.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        assert r.labels.dtype == torch.int32 and r.labels.shape == (100,)
        assert r.cost.dtype == torch.float64 and r.cost.shape == ()
        assert r.n_iter.shape == ()


def test_opcheck(devices):
    x = torch.randn(3, 200, device=devices)
    w = torch.rand(3, 200, device=devices)
    for args in [
        (x, w, 4, 0.0, "exact", "kmeans++", None, 50, 0.0, 1, "squared"),
        (x, None, 4, 1.0, "lloyd", "linear", None, 50, 0.0, 1, "squared"),
        (x.double(), w, 3, 2.0, "lloyd", "given", torch.randn(3, 3, dtype=torch.float64, device=devices),
         50, 0.0, 1, "linear"),
    ]:
        torch.library.opcheck(torch.ops.popcomp.kmeans1d.default, args)


def test_torch_compile_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 77)
        c, lab, cost, it = torch.ops.popcomp.kmeans1d(x, None, 6, 0.0, "lloyd", "linear", None, 10, 0.0, 0, "squared")
        assert c.shape == (5, 6) and lab.shape == (5, 77) and lab.dtype == torch.int32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.tensor([1.0, float("nan")]), k=1), ValueError, "x contains NaN"),
        (dict(x=torch.tensor([1.0, float("inf")]), k=1), ValueError, "x contains NaN"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, weights=torch.tensor([1.0, float("nan")])), ValueError, "weights contains NaN"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, weights=torch.tensor([1.0, -1.0])), ValueError, "weights must be non-negative"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, weights=torch.zeros(2)), ValueError, "weights are all zero"),
        (dict(x=torch.tensor([1.0, 2.0]), k=0), ValueError, "k must be >= 1"),
        (dict(x=torch.tensor([1.0, 2.0]), k=2.5), TypeError, "k must be an int"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, weights=torch.ones(3)), ValueError, "weights must have the shape"),
        (dict(x=torch.tensor([1, 2]), k=1), TypeError, "x must have a floating dtype"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, weights=torch.tensor([1, 2])), TypeError, "weights must have a floating dtype"),
        (dict(x=torch.ones(2, 2, 2), k=1), ValueError, "x must be 1-D"),
        (dict(x=torch.ones(2, 0), k=1), ValueError, "at least one value"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, weights=torch.ones(2, device="meta")), ValueError, "weights is on meta"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, method="kmeans"), ValueError, "method must be one of"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, init="random"), ValueError, "init must be one of"),
        (dict(x=torch.tensor([1.0, 2.0]), k=2, init=torch.ones(3)), ValueError, "init tensor must have shape"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, beta=-1.0), ValueError, "beta must be >= 0"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, beta=float("nan")), ValueError, "beta must be finite"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, max_iter=-1), ValueError, "max_iter must be >= 0"),
        (dict(x=torch.tensor([1.0, 2.0]), k=1, diameter="cubic"), ValueError, "diameter must be one of"),
        (dict(x=[1.0, 2.0], k=1), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    x = kwargs.pop("x")
    k = kwargs.pop("k")
    with pytest.raises(exc, match=match):
        popcomp.kmeans1d(x, k, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [40, 40000])  # sort path, and the 16-bit histogram path
def test_non_finite_and_negative_found_in_every_dtype(dtype, n):
    """The kernel's own checks (16-bit ones read the bits): NaN/+-Inf anywhere in x or the
    weights, a negative weight, in each dtype; -0.0 weights are allowed."""
    x = torch.randn(n).to(dtype)
    w = torch.rand(n).to(dtype)
    for bad in (float("nan"), float("inf"), float("-inf")):
        xb = x.clone()
        xb[n // 3] = bad
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            popcomp.kmeans1d(xb, 2, w, method="exact")
        wb = w.clone()
        wb[n - 1] = bad
        with pytest.raises(ValueError, match="weights contains NaN or Inf"):  # -inf too
            popcomp.kmeans1d(x, 2, wb)
    wb = w.clone()
    wb[1] = -0.5
    with pytest.raises(ValueError, match="weights must be non-negative"):
        popcomp.kmeans1d(x, 2, wb)
    wz = w.clone()
    wz[::2] = -0.0
    r = popcomp.kmeans1d(x, 2, wz, method="exact")
    assert torch.isfinite(r.cost)


@pytest.mark.parametrize("case", ["x_nan", "w_inf", "w_neg", "w_zero", "x_and_w", "ok"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_checks_match_the_cpu_kernel(case, dtype):
    """check_kmeans1d_values (run by the op on CUDA and by the reference) raises what the CPU
    kernel raises, for the same first bad row."""
    check_values = check_kmeans1d_values
    x = torch.randn(5, 50).to(dtype)
    w = torch.rand(5, 50).to(dtype) + 0.1
    if case in ("x_nan", "x_and_w"):
        x[3, 7] = float("nan")
    if case == "w_inf":
        w[2, 0] = float("inf")
    if case in ("w_neg", "x_and_w"):
        w[3, 1] = -1.0
        w[4, 1] = -1.0
    if case == "w_zero":
        w[1] = 0.0
    try:
        torch.ops.popcomp.kmeans1d(x, w, 3, 0.0, "exact", "kmeans++", None, 10, 0.0, 0, "squared")
        expected = None
    except ValueError as e:
        expected = str(e)
    if expected is None:
        check_values(x, w)
        assert case == "ok"
    else:
        with pytest.raises(ValueError) as info:
            check_values(x, w)
        assert str(info.value) == expected
        assert "(row " in expected


def test_bad_row_is_named(devices):
    x = torch.randn(3, 10, device=devices)
    w = torch.rand(3, 10, device=devices)
    w[2] = 0
    with pytest.raises(ValueError, match=r"all zero.*row 2"):
        popcomp.kmeans1d(x, 2, w)


def test_numpy_input():
    r = popcomp.kmeans1d(np.array([0.0, 0.1, 5.0, 5.1]), 2, method="exact")
    torch.testing.assert_close(r.centers, torch.tensor([0.05, 5.05], dtype=torch.float64))


def test_backends_report():
    b = popcomp.backends()
    assert b["cpu"]["built"] and b["cpu"]["usable"]
    assert set(b) >= {"cpu", "cuda", "reference"}
    if not torch.cuda.is_available():
        assert not b["cuda"]["usable"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_zero_is_zero(dtype, devices):
    x = torch.tensor([-0.0, 0.0, 1.0, 2.0] * 3, device=devices).to(dtype)
    r = popcomp.kmeans1d(x, 4, method="exact")
    torch.testing.assert_close(r.centers, torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=r.centers.dtype,
                                                       device=devices))
    assert int(r.labels[0]) == int(r.labels[1]) == 0


def test_exact_does_not_read_an_earlier_problems_dp_table():
    # The CPU kernel keeps its workspace between calls; the Knuth bound of the last DP row
    # must not come from the argmin table a previous problem left there.
    xv = torch.tensor([0, 0.1, 10, 10.1, 20, 20.1, 20.2, 20.3], dtype=torch.float64)
    fresh = kmeans_brute_force_cost(xv, torch.ones_like(xv), 3)
    xp = torch.tensor([0, 0.01, 0.02, 0.03, 0.04, 0.05, 10, 20, 30], dtype=torch.float64)
    popcomp.kmeans1d(xp, 3, method="exact")
    r = popcomp.kmeans1d(xv, 3, method="exact")
    assert float(r.cost) == pytest.approx(fresh, rel=1e-10)
    torch.testing.assert_close(r.centers, torch.tensor([0.05, 10.05, 20.15], dtype=torch.float64))


def test_against_reference_small(devices):
    for seed in range(10):
        x, w = data(3, 40, torch.float64, 100 + seed, zero_frac=0.2)
        for method in ("lloyd", "exact"):
            for beta in (0.0, 0.2):
                ref = kmeans1d_reference(x, w, 4, beta, method, "linear", None, 300, 0.0, 0,
                                         "squared")
                got = op(x.to(devices), w.to(devices), 4, beta=beta, method=method, init="linear")
                torch.testing.assert_close(got[0].cpu(), ref[0], rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(got[2].cpu(), ref[2], rtol=1e-8, atol=1e-10)
                assert torch.equal(got[1].cpu().long(), ref[1].long())


def test_signed_zero_is_one_value(devices):  # torch.unique (the reference) merges -0.0 and +0.0
    x = torch.tensor([[-0.0, 0.0, 1.0, 1.0, 2.0]], dtype=torch.float32)
    ref = kmeans1d_reference(x, None, 3, 0.0, "exact", "kmeans++", None, 300, 0.0, 0, "squared")
    got = op(x.to(devices), None, 3, method="exact")
    torch.testing.assert_close(got[0].cpu(), ref[0])
    assert torch.equal(got[1].cpu().long(), ref[1].long())


def test_bad_values_on_every_device(devices):
    x = torch.randn(2, 10, device=devices)
    with pytest.raises(ValueError):
        popcomp.kmeans1d(torch.full((10,), float("nan"), device=devices), 2)
    with pytest.raises(ValueError):
        popcomp.kmeans1d(x, 2, -torch.ones_like(x))
    with pytest.raises(ValueError):
        popcomp.kmeans1d(x, 2, torch.zeros_like(x))
    with pytest.raises(ValueError):
        popcomp.kmeans1d(x, 0)


# ---- exact method on badly scaled data: the double-double DP ----------------------------------
# The float64 DP ranks partitions by costs from prefix sums, each off by about
# eps (W v_max^2 + S2) (exact_dp_precise.h); where that is not negligible next to the optimum
# (values ~1e6 times the rest, weights spread over 1e10, both) the CPU backend solves the row
# again in double-double. Checked against exact rational arithmetic (fractions.Fraction).

TRUST_RATIO = 1e-6  # kTrustRatio of csrc/kmeans/exact_dp_precise.h


def badly_scaled_near_tie(case, seed, dtype):
    """About 10-16 values: inliers symmetric about a dyadic centre (an asymmetric optimum has a
    mirror image of equal cost) with one extreme inlier moved by 2^-20 (exact in float32 too),
    which breaks the tie by about 1e-6 of the cost: below what the float64 DP resolves on such
    data. case: outliers ~1e6 times the inliers' spread at the low end, the high end or both
    ('low', 'high', 'both_ends'); weights spread over 1e10, a few heavy and many light
    ('weights': three heavy values, two of them a few times the light ones' spread out); or
    heavy outliers at both ends with light inliers ('both'). Returns x, w and the number of
    values or groups of values that take a cluster of their own."""
    rng = np.random.default_rng(seed)
    m = int(rng.integers(4, 6))
    groups = 0
    r = np.sort(rng.choice(np.arange(1, 3 * 1024), m, replace=False)) / 1024.0
    c = int(rng.integers(-512, 512)) / 1024.0
    x = np.concatenate([c - r[::-1], [c], c + r])
    wr = rng.random(m) + 0.5
    w = np.concatenate([wr[::-1], [rng.random() + 0.5], wr])
    light = case in ("weights", "both")
    if light:  # the centre heavy, the rest 1e-10 times lighter
        w = w * 1e-10
        w[m] = 1.0
        if case == "weights":  # and a heavy mirrored pair further out
            d = 4 * r[-1] + int(rng.integers(0, 4 * 1024)) / 1024.0
            x = np.concatenate([x, [c - d, c + d]])
            w = np.concatenate([w, [1.0, 1.0]])
            groups += 2
        elif rng.random() < 0.5:  # or one heavy mirrored pair among the light ones
            i = int(rng.integers(0, m))
            w[m - 1 - i] = w[m + 1 + i] = 1.0
    x[int(rng.choice([0, 2 * m]))] += 2.0 ** -20 * rng.choice([-1, 1])
    for side, s in (("low", -1.0), ("high", 1.0)):
        if case in (side, "both_ends", "both"):
            no = int(rng.integers(1, 3))
            x = np.concatenate([x, s * 1e6 * (1 + rng.random(no))])
            w = np.concatenate([w, np.ones(no) if light else rng.random(no) + 0.5])
            groups += 1
    p = rng.permutation(x.size)
    return torch.from_numpy(x[p]).to(dtype), torch.from_numpy(w[p]), groups


@pytest.mark.parametrize("case", ["low", "high", "both_ends", "weights", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("trial", range(8))
def test_exact_badly_scaled_is_optimal_exact_oracle(case, dtype, trial):
    x, w, groups = badly_scaled_near_tie(case, trial, dtype)
    xd = x.double()
    for kin in (2, 3, 4):  # clusters for the inliers (even ones always have a mirror tie)
        k = kin + groups
        r = popcomp.kmeans1d(x, k, w, method="exact")
        best = kmeans_brute_force_cost_exact(xd, w, k)
        got = kmeans_labels_cost_exact(xd, w, r.labels)
        assert best > 0
        assert float((got - best) / best) <= 1e-12, (k, float(got), float(best))
        # the reported cost is that of the returned labels and centers
        assert float(r.cost) == pytest.approx(float(got), rel=1e-12)
        # centers: each cluster's weighted mean (float32 centers for float32 values)
        tol = 1e-12 if dtype == torch.float64 else 2.0 ** -23
        for j in range(k):
            sel = r.labels == j
            if bool(sel.any()) and float(w[sel].sum()) > 0:
                mean = float((w[sel] * xd[sel]).sum() / w[sel].sum())
                assert float(r.centers[j]) == pytest.approx(mean, rel=tol, abs=tol)


def _far_cluster_across_a_binade(seed):
    """float64 inliers near 0 (value - median rounds: the median has all 52 bits) and a far
    cluster symmetric about a centre near 2^19, one extreme moved by one ulp (a tie broken at
    about 1e-11 of the cost). The cluster straddles 2^19, so value - median rounds by a
    different offset on either side: the ranking needs the exact differences."""
    rng = np.random.default_rng(seed)
    inl = rng.standard_normal(int(rng.integers(7, 9)))
    m = int(rng.integers(2, 4))
    cf = 2.0**19 + rng.random() - 0.5
    r = np.sort(rng.choice(np.arange(1, 1024), m, replace=False)) / 1024.0
    far = np.concatenate([cf - r[::-1], [cf], cf + r])
    i = int(rng.choice([0, 2 * m]))
    far[i] = np.nextafter(far[i], np.inf if rng.random() < 0.5 else -np.inf)
    x = np.concatenate([inl, far])
    w = rng.random(x.size) + 0.5
    wf = rng.random(m) + 0.5
    w[inl.size:] = np.concatenate([wf[::-1], [rng.random() + 0.5], wf])
    return torch.from_numpy(x), torch.from_numpy(w)


@pytest.mark.parametrize("seed", [52, 58, 72, 134])  # where rounded differences mislead
def test_exact_far_cluster_needs_exact_centring(seed):
    x, w = _far_cluster_across_a_binade(seed)
    for k in (3, 4, 5):
        r = popcomp.kmeans1d(x, k, w, method="exact")
        best = kmeans_brute_force_cost_exact(x, w, k)
        got = kmeans_labels_cost_exact(x, w, r.labels)
        assert float((got - best) / best) <= 1e-12, (k, float(got), float(best))
        # the reported cost sums W (x - c)^2 over the original values (values centred by
        # rounding were off by about eps |x - median| / spread, here up to ~2e-10)
        assert float(r.cost) == pytest.approx(float(got), rel=1e-12)


def _badly_scaled_large(case, seed, n=2000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    w = rng.random(n) + 0.5
    no = int(rng.integers(2, 6))
    if case in ("low", "mixed"):
        x[:no] = -1e7 * (1 + rng.random(no))
    if case == "mixed":  # heavy outliers, light inliers with a few heavy ones among them
        w = 1e-10 * (rng.random(n) + 0.5)
        w[rng.choice(n, int(rng.integers(2, 6)), replace=False)] = rng.random() + 0.5
        w[:no] = 1.0
    return torch.from_numpy(x), torch.from_numpy(w)


@pytest.mark.parametrize("case,seed,k", [("low", 2, 16), ("low", 10, 16), ("mixed", 0, 8),
                                         ("mixed", 1, 16), ("mixed", 3, 8)])
def test_exact_badly_scaled_large_against_stable_dp(case, seed, k):
    """2000 values where the float64 prefix-sum DP alone returns a partition 0.6% to 2e5 times
    the optimum above it (outliers ~1e7 times the rest; with weights spread over
    1e10 as well): the answer is at least as good as that of an O(k u^2) DP whose segment
    costs are computed stably (no prefix sums), both costs in exact arithmetic."""
    x, w = _badly_scaled_large(case, seed)
    r = popcomp.kmeans1d(x, k, w, method="exact")
    ours = kmeans_labels_cost_exact(x, w, r.labels)
    ref = kmeans_labels_cost_exact(x, w, kmeans_dp_stable_labels(x.numpy(), w.numpy(), k))
    assert float((ours - ref) / ref) <= 1e-12, (float(ours), float(ref))
    assert float(r.cost) == pytest.approx(float(ours), rel=1e-12)


def test_exact_badly_scaled_threads_agree():
    """Rows of more than 4096 values: the precise DP splits each layer across threads at pivot
    rows; one thread and two give partitions of the same exact cost."""
    for case, seed, k in [("mixed", 0, 8), ("mixed", 1, 16), ("low", 2, 16)]:
        x, w = _badly_scaled_large(case, seed, n=6000)
        assert _trust_ratio(x, w, float(popcomp.kmeans1d(x, k, w, method="exact").cost)) > TRUST_RATIO
        before = torch.get_num_threads()
        costs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                r = popcomp.kmeans1d(x, k, w, method="exact")
            finally:
                torch.set_num_threads(before)
            costs.append(kmeans_labels_cost_exact(x, w, r.labels))
            assert float(r.cost) == pytest.approx(float(costs[-1]), rel=1e-12)
        assert abs(float((costs[1] - costs[0]) / costs[0])) <= 1e-12


def _trust_ratio(x, w, cost):
    """eps (W v_max^2 + S2) / D as exact_dp_precise.cpp forms it (values centred on the
    median distinct value; v_max over values of positive weight)."""
    v, inv = np.unique(x.double().numpy(), return_inverse=True)
    W = np.bincount(inv, weights=np.ones(x.numel()) if w is None else w.double().numpy())
    vc = v - v[v.size // 2]
    vmax = np.abs(vc[W > 0]).max()
    return 2.0 ** -53 * (W.sum() * vmax**2 + (W * vc * vc).sum()) / cost


def test_exact_trust_bound_keeps_ordinary_data_on_the_fast_path():
    """Calibration of kTrustRatio: on ordinary data the float64 DP's bound stays far below it
    (at most ~2e-8 at k = 256, up to 1e6 values, in the calibration runs), so the fast DP is
    never redone; badly scaled data lies far above it."""
    rng = np.random.default_rng(7)

    def nn_row(n):  # a weight row with a few outliers of 50 sigma
        x = 0.02 * rng.standard_normal(n)
        i = rng.choice(n, max(1, n // 1000), replace=False)
        x[i] = 0.02 * 50 * rng.choice([-1.0, 1.0], i.size)
        return x

    gens = [rng.standard_normal, lambda n: rng.laplace(size=n), lambda n: rng.standard_t(3, n),
            nn_row]
    weights = [lambda n: None, lambda n: rng.random(n) + 0.01,
               lambda n: np.exp(rng.uniform(np.log(1e-2), 0.0, n)),  # spread over 1e2
               lambda n: rng.standard_normal(n) ** 2 + 1e-2]  # squared activations
    worst = 0.0
    for n, ks in [(4096, (16, 256)), (65536, (16, 256))]:
        for g in gens:
            for wg in weights:
                x = torch.from_numpy(g(n)).float()
                ww = wg(n)
                wt = None if ww is None else torch.from_numpy(ww).float()
                for k in ks:
                    r = popcomp.kmeans1d(x, k, wt, method="exact")
                    worst = max(worst, _trust_ratio(x, wt, float(r.cost)))
    assert worst < TRUST_RATIO / 10, worst
    # what the badly scaled cases above reach
    for case in ("low", "weights", "both"):
        x, w, groups = badly_scaled_near_tie(case, 0, torch.float64)
        r = popcomp.kmeans1d(x, 3 + groups, w, method="exact")
        assert _trust_ratio(x, w, float(r.cost)) > TRUST_RATIO * 10


def test_trust_ratio_is_the_compiled_one():
    C = popcomp._backend.compiled()
    if C is None:
        pytest.skip("no compiled core")
    assert C.kmeans_exact_trust_ratio == TRUST_RATIO


def _stack_rows(rows):
    """Rows of equal length as (x, w) tensors (float64)."""
    return (torch.stack([torch.as_tensor(x, dtype=torch.float64) for x, _ in rows]),
            torch.stack([torch.as_tensor(w, dtype=torch.float64) for _, w in rows]))


def test_cuda_backend_check_flags_what_the_cpu_bound_flags():
    """The CUDA backend has no double-double DP: it solves again on the CPU the exact rows its
    check (exact_untrusted_rows, any device: run here on CPU tensors) flags. The check is a
    conservative form of the CPU's bound: it flags every badly scaled row the CPU's bound
    flags, no ordinary row, no row of cost 0; it is invariant to powers of two on the values
    and the weights (no overflow at 1e+-200) and to its chunking."""
    from popcomp.ops.backends.cuda.kmeans1d import exact_untrusted_rows

    rng = np.random.default_rng(3)
    n, k = 2000, 8
    bad = [_badly_scaled_large(case, seed) for case, seed in
           [("low", 2), ("low", 10), ("mixed", 0), ("mixed", 1), ("mixed", 3)]]
    ordinary = [(rng.standard_normal(n), rng.random(n) + 0.01),
                (rng.standard_t(3, n), np.exp(rng.uniform(np.log(1e-2), 0.0, n))),
                (rng.laplace(size=n), rng.standard_normal(n) ** 2 + 1e-2)]
    few = [(np.repeat(rng.standard_normal(k), n // k), rng.random(n) + 0.5)]  # k values: cost 0
    x, w = _stack_rows([(a.numpy(), b.numpy()) for a, b in bad] + ordinary + few)
    r = popcomp.kmeans1d(x, k, w, method="exact")
    flags = exact_untrusted_rows(x, w, r.labels, k, TRUST_RATIO)
    want = [True] * len(bad) + [False] * (len(ordinary) + len(few))
    assert flags.tolist() == want
    for i in range(len(bad)):  # as the CPU's own bound says
        assert _trust_ratio(x[i], w[i], float(r.cost[i])) > TRUST_RATIO
    # invariances: powers of two on values and weights, any chunking, weights None
    for sx, sw in ((2.0 ** 600, 2.0 ** -700), (2.0 ** -650, 2.0 ** 640)):
        got = exact_untrusted_rows(x * sx, w * sw, r.labels, k, TRUST_RATIO)
        assert got.tolist() == want
    assert exact_untrusted_rows(x, w, r.labels, k, TRUST_RATIO, budget=777).tolist() == want
    r1 = popcomp.kmeans1d(x[len(bad):], k, method="exact")
    assert not exact_untrusted_rows(x[len(bad):], None, r1.labels, k, TRUST_RATIO).any()
    # the write-back (CPU tensors standing in for the device's): flagged rows get the CPU
    # backend's answer in place of what the device gave, the others are left as they were
    from popcomp.ops.backends.cuda.kmeans1d import solve_untrusted_on_cpu

    outs = (torch.full_like(r.centers, float("nan")), r.labels.clone(),
            torch.full_like(r.cost, float("nan")), torch.full_like(r.n_iter, -1))
    solve_untrusted_on_cpu(x, w, k, 0.0, "exact", "kmeans++", None, 300, 0.0, 0, "squared", outs)
    flagged = torch.tensor(want)
    torch.testing.assert_close(outs[0][flagged], r.centers[flagged], rtol=0, atol=0)
    torch.testing.assert_close(outs[2][flagged], r.cost[flagged], rtol=0, atol=0)
    assert torch.equal(outs[1], r.labels)
    assert outs[0][~flagged].isnan().all() and outs[2][~flagged].isnan().all()
    assert (outs[3][~flagged] == -1).all() and (outs[3][flagged] >= 0).all()


# ---- the CUDA kernel against the CPU kernel ---------------------------------------------------
def both(x, w, k, **kw):
    ic = kw.get("init_centers")
    cpu = op(x.cpu(), None if w is None else w.cpu(), k,
             **{**kw, "init_centers": None if ic is None else ic.cpu()})
    gpu = op(x.cuda(), None if w is None else w.cuda(), k,
             **{**kw, "init_centers": None if ic is None else ic.cuda()})
    torch.cuda.synchronize()
    return cpu, tuple(t.cpu() for t in gpu)


def assert_same(cpu, gpu, label_frac=1.0):
    c0, l0, f0, i0 = cpu
    c1, l1, f1, i1 = gpu
    assert c1.dtype == torch.float64 and l1.dtype == l0.dtype and i1.dtype == torch.int64
    assert c1.shape == c0.shape and l1.shape == l0.shape
    scale = float(c0.abs().max()) + 1e-300
    torch.testing.assert_close(c1, c0, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(f1, f0, rtol=1e-8, atol=1e-12 * (float(f0.abs().max()) + 1.0))
    same = (l1 == l0).double().mean().item()
    assert same >= label_frac, f"labels agree on {same:.6f}"
    assert torch.equal(i1, i0)
    assert bool((c1[:, 1:] >= c1[:, :-1]).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["lloyd", "exact"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_rows_match_cpu(dtype, method, beta, weighted, cuda_device):
    x, w = data(8, 300, dtype, 1, weighted)
    cpu, gpu = both(x, w, 5, beta=beta, method=method)
    assert_same(cpu, gpu)


@pytest.mark.parametrize("init", ["kmeans++", "linear", "quantile"])
@pytest.mark.parametrize("diameter", ["squared", "linear"])
def test_cuda_inits_and_diameters(init, diameter, cuda_device):
    x, w = data(6, 500, torch.float32, 2)
    cpu, gpu = both(x, w, 7, beta=0.3, init=init, diameter=diameter)
    assert_same(cpu, gpu)


def test_cuda_given_init(cuda_device):
    x, w = data(4, 200, torch.float64, 3)
    ic = torch.linspace(-1, 1, 6, dtype=torch.float64).expand(4, 6).contiguous()
    cpu, gpu = both(x, w, 6, init="given", init_centers=ic, beta=0.1)
    assert_same(cpu, gpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["lloyd", "exact"])
def test_cuda_single_large_problem(dtype, method, cuda_device):
    n = (1 << 18) if method == "lloyd" else (1 << 15)
    x, w = data(1, n, dtype, 4)
    cpu, gpu = both(x, w, 16, method=method, max_iter=100)
    assert_same(cpu, gpu, label_frac=0.9999)


def test_cuda_badly_scaled_exact_rows_are_solved_on_the_cpu(cuda_device):
    # the CUDA DP alone is 0.6% to 2e5x above the optimum on these rows; the backend's check
    # sends them to the CPU (double-double DP): the same exact cost as the CPU, beside an
    # ordinary row that stays on the device
    rows = [_badly_scaled_large(case, seed) for case, seed in [("low", 2), ("mixed", 0)]]
    rng = np.random.default_rng(5)
    rows.append((torch.from_numpy(rng.standard_normal(2000)), torch.from_numpy(rng.random(2000) + 0.5)))
    x, w = torch.stack([a for a, _ in rows]), torch.stack([b for _, b in rows])
    cpu = popcomp.kmeans1d(x, 8, w, method="exact")
    gpu = popcomp.kmeans1d(x.to(cuda_device), 8, w.to(cuda_device), method="exact")
    for i in range(x.shape[0]):
        want = kmeans_labels_cost_exact(x[i], w[i], cpu.labels[i])
        got = kmeans_labels_cost_exact(x[i], w[i], gpu.labels[i].cpu())
        assert abs(float((got - want) / want)) <= 1e-12, i
    torch.testing.assert_close(gpu.cost.cpu(), cpu.cost, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_few_long_rows(dtype, cuda_device):  # the (row, key) composite sort path: n >= 65536, rows > 1
    x, w = data(3, 70000, dtype, 5)
    cpu, gpu = both(x, w, 8, method="exact")
    assert_same(cpu, gpu, label_frac=0.9999)
    cpu, gpu = both(x, None, 8, method="lloyd", max_iter=50)
    assert_same(cpu, gpu, label_frac=0.9999)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_many_rows_exact(dtype, cuda_device):
    x, w = data(256, 1024, dtype, 6)
    cpu, gpu = both(x, w, 16, method="exact")
    assert_same(cpu, gpu)


@pytest.mark.parametrize("method", ["lloyd", "exact"])
def test_cuda_ties_and_zero_weights(method, cuda_device):
    x, w = data(5, 400, torch.float64, 7, zero_frac=0.3, levels=12)
    cpu, gpu = both(x, w, 6, method=method)
    assert_same(cpu, gpu)


@pytest.mark.parametrize("method", ["lloyd", "exact"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_cuda_edge_cases(method, beta, cuda_device):
    # k = 1
    x, w = data(3, 50, torch.float32, 8)
    assert_same(*both(x, w, 1, method=method, beta=beta))
    # k >= u (few distinct values), surplus centers repeat the largest
    x = torch.tensor([[1.0, 2.0, 2.0, 5.0, 1.0], [3.0, 3.0, 3.0, 3.0, 4.0]])
    cpu, gpu = both(x, None, 4, method=method, beta=beta)
    assert_same(cpu, gpu)
    # all values equal
    x = torch.full((2, 64), 0.75, dtype=torch.float16)
    assert_same(*both(x, None, 3, method=method, beta=beta))
    # one value per problem
    x = torch.randn(7, 1)
    assert_same(*both(x, None, 2, method=method, beta=beta))


def test_cuda_public_api_and_stream(cuda_device):
    x, w = data(4, 1000, torch.bfloat16, 9)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        r = popcomp.kmeans1d(x.cuda(), 8, w.cuda(), method="exact", beta=0.1)
    s.synchronize()
    c = popcomp.kmeans1d(x, 8, w, method="exact", beta=0.1)
    torch.testing.assert_close(r.centers.cpu(), c.centers, rtol=1e-6, atol=1e-6)
    assert torch.equal(r.labels.cpu(), c.labels)


def test_cuda_workspace_bound_is_enough(cuda_device):
    C = popcomp._backend.compiled()
    for rows, n, k, method, dt in [(1, 1, 1, 0, 1), (4096, 4096, 16, 1, 2), (1, 10**6, 16, 0, 0)]:
        assert C.kmeans1d_cuda_workspace(rows=rows, n=n, k=k, method=method, x_dtype=dt) > 0
