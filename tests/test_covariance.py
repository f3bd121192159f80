"""popcomp::covariance_accumulate and popcomp::greedy_select: kernels vs references vs brute force,
on every device (the `devices` fixture), and the CUDA kernels against the CPU ones."""
import itertools

import pytest
import torch

import popcomp
from popcomp.ops.backends.reference.greedy_select import greedy_select_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _ref_acc(x, acc_dtype, channel_dim=None):
    if x.dim() == 2:
        xs = x
    elif channel_dim == -1:
        xs = x.reshape(-1, x.shape[-1])
    else:
        xs = x.movedim(1, -1).reshape(-1, x.shape[1])
    xs = xs.to(torch.float64)
    return (xs.T @ xs).to(acc_dtype), xs.shape[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 7, 37, 130])
def test_accumulate_matches_matmul(dtype, acc_dtype, m, devices):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(301, m, generator=g).to(dtype)
    acc0 = torch.randn(m, m, generator=g, dtype=torch.float64).to(acc_dtype)
    acc, count = popcomp.covariance_accumulate(x.to(devices), acc0.clone().to(devices), torch.tensor(5, device=devices))
    acc, count = acc.cpu(), count.cpu()
    want, n = _ref_acc(x, torch.float64)
    tol = 1e-5 if acc_dtype == torch.float32 else 1e-12
    scale = float(want.abs().max()) + 1
    assert float((acc.double() - acc0.double() - want).abs().max()) <= tol * scale
    assert int(count) == 5 + n


@pytest.mark.parametrize("threads,N,m", [(2, 4000, 100), (3, 5000, 90), (4, 1000, 200), (2, 700, 300)])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_accumulate_parallel_schemes(monkeypatch, threads, N, m, acc_dtype):
    """Both CPU schemes: per-thread sample ranges (N >= threads * chunk) and shared chunks."""
    monkeypatch.setenv("POPCOMP_NUM_THREADS", str(threads))
    x = torch.randn(N, m, generator=torch.Generator().manual_seed(N)).to(torch.bfloat16)
    acc0 = torch.randn(m, m, dtype=acc_dtype)
    acc, count = popcomp.covariance_accumulate(x, acc0.clone())
    want, n = _ref_acc(x, torch.float64)
    tol = 1e-5 if acc_dtype == torch.float32 else 1e-12
    assert float((acc.double() - acc0.double() - want).abs().max()) <= tol * float(want.abs().max())
    assert int(count) == N


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided", "transposed", "features_last"])
def test_accumulate_layouts_read_in_place(layout, devices):
    g = torch.Generator().manual_seed(1)
    if layout in ("nchw", "channels_last"):
        x = torch.randn(3, 11, 5, 6, generator=g, dtype=torch.bfloat16)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        acc, count = popcomp.covariance_accumulate(x.to(devices), dtype=torch.float64)
        want, n = _ref_acc(x, torch.float64)
    elif layout == "strided":
        x = torch.randn(50, 40, generator=g)
        acc, count = popcomp.covariance_accumulate(x.to(devices)[:, ::3], dtype=torch.float64)
        want, n = _ref_acc(x[:, ::3], torch.float64)
    elif layout == "transposed":
        x = torch.randn(9, 60, generator=g, dtype=torch.float16)
        acc, count = popcomp.covariance_accumulate(x.to(devices).T, dtype=torch.float64)
        want, n = _ref_acc(x.T, torch.float64)
    else:
        x = torch.randn(4, 7, 9, generator=g)
        acc, count = popcomp.covariance_accumulate(x.to(devices), dtype=torch.float64, channel_dim=-1)
        want, n = _ref_acc(x, torch.float64, channel_dim=-1)
    acc = acc.cpu()
    assert int(count) == n
    torch.testing.assert_close(acc, want, rtol=1e-10, atol=1e-10)


def test_accumulate_streams_and_symmetric(devices):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 23, generator=g)
    acc = count = None
    for chunk in x.to(devices).split(77):
        acc, count = popcomp.covariance_accumulate(chunk, acc, count, dtype=torch.float64)
    acc = acc.cpu()
    want, n = _ref_acc(x, torch.float64)
    assert int(count) == 1000
    torch.testing.assert_close(acc, want)
    assert torch.equal(acc, acc.T)
    accu = popcomp.CovarianceAccumulator(dtype=torch.float64)
    for chunk in x.to(devices).split(300):
        accu.update(chunk)
    torch.testing.assert_close(accu.covariance().cpu(), want / 1000)


def test_accumulator_all_reduces_when_distributed(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        x = torch.randn(40, 5, dtype=torch.float64)
        accu = popcomp.CovarianceAccumulator(dtype=torch.float64)
        accu.update(x)
        torch.testing.assert_close(accu.covariance(), x.T @ x / 40)
        assert int(accu.count) == 40  # the running sums are not modified by the all-reduce
    finally:
        dist.destroy_process_group()


def test_accumulate_empty_and_bad_inputs(devices):
    z = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=devices)  # noqa: E731
    acc, count = popcomp.covariance_accumulate(z(0, 4))
    assert int(count) == 0 and float(acc.abs().sum()) == 0
    # an empty batch of conv activations (B = 0, or no spatial positions) adds nothing
    for shape in [(0, 4, 3, 3), (0, 4, 5), (2, 4, 0, 3)]:
        acc, count = popcomp.covariance_accumulate(z(*shape))
        assert acc.shape == (4, 4) and int(count) == 0 and float(acc.abs().sum()) == 0
    with pytest.raises(TypeError, match="x"):
        popcomp.covariance_accumulate(z(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="acc"):
        popcomp.covariance_accumulate(z(3, 4), z(3, 3))
    with pytest.raises(TypeError, match="acc"):
        popcomp.covariance_accumulate(z(3, 4), z(4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="count"):
        popcomp.covariance_accumulate(z(3, 4), None, z())
    with pytest.raises(ValueError, match="x"):
        popcomp.covariance_accumulate(z(4))


def test_opcheck_accumulate(devices):
    for x, ad in [(torch.randn(20, 6), torch.float32), (torch.randn(2, 5, 7).to(torch.bfloat16), torch.float64)]:
        m = x.shape[1]
        torch.library.opcheck(
            torch.ops.popcomp.covariance_accumulate.default,
            (x.to(devices), torch.zeros(m, m, dtype=ad, device=devices),
             torch.zeros((), dtype=torch.int64, device=devices)),
        )


# ---- greedy ------------------------------------------------------------------------------------


def _objective(S, J, tau, M):
    if not J:
        return float((M * S).sum())
    J = list(J)
    G = S[J][:, J] + torch.diag(tau[J])
    R = S - S[:, J] @ torch.linalg.inv(G) @ S[J]
    return float((M * R).sum())  # Tr[M R] with M, R symmetric


def brute_force_greedy(S, k, tau, theta, Z):
    m = S.shape[0]
    M = torch.eye(m, dtype=torch.float64) if Z is None else theta * torch.eye(m, dtype=torch.float64) + (1 - theta) * Z.T @ Z
    J, objs = [], []
    for _ in range(k):
        best, bj = None, None
        for j in range(m):
            if j in J:
                continue
            v = _objective(S, J + [j], tau, M)
            if best is None or v < best - 1e-12 * abs(best):
                best, bj = v, j
        J.append(bj)
        objs.append(best)
    return J, objs


def _cov(m, n=None, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    n = n or 3 * m
    A = torch.randn(n, rank or m, generator=g, dtype=torch.float64)
    if rank is not None:
        A = A @ torch.randn(rank, m, generator=g, dtype=torch.float64)
    A = A * torch.linspace(0.2, 2.0, m, dtype=torch.float64)
    return A.T @ A / n


def _on(device, S, k, tau, theta=1.0, Z=None):
    """greedy_select with its tensors on ``device``; the result back on the CPU."""
    to = lambda t: t if t is None or not isinstance(t, torch.Tensor) else t.to(device)  # noqa: E731
    r = popcomp.greedy_select(to(S), k, tau=to(tau), theta=theta, Z=to(Z))
    return popcomp.GreedyResult(r.indices.cpu(), r.objective.cpu(), r.initial_objective)


@pytest.mark.parametrize("theta", [1.0, 0.6, 0.0])
@pytest.mark.parametrize("tau_kind", ["zero", "const", "random"])
@pytest.mark.parametrize("z_kind", [None, "narrow", "wide"])
def test_greedy_equals_brute_force(theta, tau_kind, z_kind, devices):
    m, k = 12, 8
    seed = hash((theta, tau_kind, z_kind)) % 1000
    S = _cov(m, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    tau = {"zero": torch.zeros(m, dtype=torch.float64), "const": torch.full((m,), 0.3, dtype=torch.float64),
           "random": torch.rand(m, generator=g, dtype=torch.float64)}[tau_kind]
    Z = None if z_kind is None else torch.randn(4 if z_kind == "narrow" else 20, m, generator=g, dtype=torch.float64)
    if theta == 0.0 and Z is None:
        theta = 0.0  # Z = I: theta is irrelevant
    res = _on(devices, S, k, tau=tau, theta=theta, Z=Z)
    J, objs = brute_force_greedy(S, k, tau, theta, Z)
    assert res.indices.tolist() == J
    torch.testing.assert_close(res.objective, torch.tensor(objs, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    ri, ro = greedy_select_reference(S, k, tau, theta, Z)
    assert ri.tolist() == J
    torch.testing.assert_close(ro, res.objective, rtol=1e-9, atol=1e-9)
    assert res.initial_objective >= float(res.objective[0])
    assert bool((res.objective[1:] <= res.objective[:-1] + 1e-12).all())


@pytest.mark.parametrize("theta,z", [(1.0, False), (0.4, True)])
def test_greedy_multithreaded_matches_reference(monkeypatch, theta, z):
    """m large enough for the threaded CPU path (triangle split, per-thread partials)."""
    monkeypatch.setenv("POPCOMP_NUM_THREADS", "2")
    m, k = 1536, 24
    g = torch.Generator().manual_seed(21)
    A = torch.randn(m // 2, m, generator=g, dtype=torch.float64) * torch.linspace(0.1, 1.0, m, dtype=torch.float64)
    S = A.T @ A / A.shape[0]
    tau = torch.full((m,), 1e-3, dtype=torch.float64)
    Z = torch.randn(40, m, generator=g, dtype=torch.float64) if z else None
    res = popcomp.greedy_select(S, k, tau=tau, theta=theta, Z=Z)
    ri, ro = greedy_select_reference(S, k, tau, theta, Z)
    assert res.indices.tolist() == ri.tolist()
    torch.testing.assert_close(res.objective, ro, rtol=1e-9, atol=1e-9)


def test_greedy_rank_deficient_and_full_k(devices):
    S = _cov(15, seed=3, rank=5)
    res = _on(devices, S, 15, tau=0.0)
    assert sorted(res.indices.tolist()) == list(range(15))
    J, objs = brute_force_greedy(S, 4, torch.zeros(15, dtype=torch.float64), 1.0, None)
    assert res.indices[:4].tolist() == J  # the 5th step is an exact tie (any unit completes the rank)
    assert abs(float(res.objective[4])) < 1e-8 * float(S.trace())  # rank 5: all explained
    assert bool((res.objective[5:].abs() < 1e-8 * float(S.trace())).all())


def test_greedy_ties_go_to_lowest_index(devices):
    S = torch.eye(6, dtype=torch.float64)
    res = _on(devices, S, 6, tau=0.0)
    assert res.indices.tolist() == [0, 1, 2, 3, 4, 5]
    S = torch.zeros(4, 4, dtype=torch.float64)
    assert _on(devices, S, 4, tau=0.0).indices.tolist() == [0, 1, 2, 3]
    S = torch.ones(3, 3, dtype=torch.float64)  # identical units
    assert _on(devices, S, 3, tau=0.0).indices.tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", [0.0, 1e-30, 1e-14])
def test_greedy_duplicate_channels_with_tiny_tau(dtype, tau, devices):
    """Duplicates (and a zero channel) are explained once their twin is chosen: with a ridge at
    the rounding level their rounding-noise residual must not outscore a genuine unit (here a
    small independent channel, then the explained twins 4, 5 by the lowest-index rule)."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(400, 4, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.5, 1.0], dtype=torch.float64)
    small = torch.randn(400, 1, generator=g, dtype=torch.float64) * 1e-2
    X = torch.cat([X, X[:, :2], small, torch.zeros(400, 1, dtype=torch.float64)], 1)  # 4, 5 twins of 0, 1
    S = (X.T @ X / 400).to(dtype)
    for fn in ("kernel", "reference"):
        if fn == "kernel":
            res = _on(devices, S, 7, tau=tau)
            idx, obj = res.indices, res.objective
        else:
            idx, obj = greedy_select_reference(S, 7, torch.full((8,), tau, dtype=torch.float64), 1.0, None)
        assert sorted(idx[:4].tolist()) == [0, 1, 2, 3], (fn, idx)
        assert idx[4:].tolist() == [6, 4, 5], (fn, idx)
        floor = 1e-3 * float(S.trace()) * (1e-12 if dtype == torch.float64 else 1e-5)
        assert bool((obj >= -floor).all()), (fn, obj)
        assert abs(float(obj[-1])) <= floor + 100 * tau, (fn, obj)  # + the ridge's own error


def test_greedy_float32_close_to_float64(devices):
    S = _cov(64, seed=5)
    Z = torch.randn(10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tau = torch.full((64,), 1e-2, dtype=torch.float64)
    r64 = _on(devices, S, 20, tau=tau, theta=0.5, Z=Z)
    r32 = _on(devices, S.float(), 20, tau=tau, theta=0.5, Z=Z.float())
    assert r32.indices[:10].tolist() == r64.indices[:10].tolist()
    torch.testing.assert_close(r32.objective, r64.objective, rtol=1e-4, atol=1e-5)


def test_greedy_default_tau_is_paper_default(devices):
    S = _cov(20, seed=7).to(devices)
    res = popcomp.greedy_select(S, 5)
    tau = popcomp.prune.default_tau(S, 5)
    res2 = popcomp.greedy_select(S, 5, tau=tau)
    assert res.indices.tolist() == res2.indices.tolist()


def test_greedy_bad_inputs(devices):
    S = _cov(6).to(devices)
    with pytest.raises(ValueError, match="k"):
        popcomp.greedy_select(S, 0, tau=0.0)
    with pytest.raises(ValueError, match="k"):
        popcomp.greedy_select(S, 7, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        popcomp.greedy_select(S, 2, tau=-0.1)
    with pytest.raises(ValueError, match="tau"):
        popcomp.greedy_select(S, 2, tau=-torch.ones(6, device=devices))
    with pytest.raises(ValueError, match="tau"):
        popcomp.greedy_select(S, 2, tau=torch.ones(5, device=devices))
    with pytest.raises(ValueError, match="theta"):
        popcomp.greedy_select(S, 2, tau=0.0, theta=1.5)
    with pytest.raises(ValueError, match="Z"):
        popcomp.greedy_select(S, 2, tau=0.0, theta=0.5, Z=torch.ones(3, 5, dtype=torch.float64, device=devices))
    bad = S.clone()
    bad[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        popcomp.greedy_select(bad, 2, tau=0.0)
    bad = S.clone()
    bad[2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        popcomp.greedy_select(bad, 2, tau=0.0)
    with pytest.raises(ValueError, match="square"):
        popcomp.greedy_select(torch.ones(3, 4, dtype=torch.float64, device=devices), 2, tau=0.0)
    with pytest.raises(TypeError, match="cov"):
        popcomp.greedy_select(S.half(), 2, tau=0.0)


def test_opcheck_greedy(devices):
    S = _cov(9, seed=11).to(devices)
    tau = torch.full((9,), 0.1, dtype=torch.float64, device=devices)
    Z = torch.randn(3, 9, dtype=torch.float64).to(devices)
    for args in [(S, 4, tau, 1.0, None), (S.float(), 3, tau, 0.5, Z.float()), (S, 9, tau, 0.0, Z)]:
        torch.library.opcheck(torch.ops.popcomp.greedy_select.default, args)


# ---- CUDA against CPU ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,acc_dtype", list(itertools.product(DTYPES, [torch.float32, torch.float64])))
def test_cuda_accumulate_equals_cpu(dtype, acc_dtype, cuda_device):
    g = torch.Generator().manual_seed(3)
    for shape in [(2000, 37), (3000, 300), (3, 16, 9, 9)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        a_cpu, c_cpu = popcomp.covariance_accumulate(x, dtype=acc_dtype)
        a_gpu, c_gpu = popcomp.covariance_accumulate(x.cuda(), dtype=acc_dtype)
        assert int(c_gpu) == int(c_cpu)
        tol = 1e-4 if acc_dtype == torch.float32 else 1e-10
        torch.testing.assert_close(a_gpu.cpu(), a_cpu, rtol=tol, atol=tol * float(a_cpu.abs().max()))
    xc = torch.randn(4, 8, 5, 5, generator=g).to(dtype).cuda().to(memory_format=torch.channels_last)
    a, _ = popcomp.covariance_accumulate(xc, dtype=torch.float64)
    want, _ = _ref_acc(xc.cpu(), torch.float64)
    torch.testing.assert_close(a.cpu(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("theta,z", [(1.0, False), (0.5, True), (0.0, True)])
def test_cuda_greedy_equals_cpu(dtype, theta, z, cuda_device):
    S = _cov(200, seed=13).to(dtype)
    Z = torch.randn(30, 200, dtype=dtype, generator=torch.Generator().manual_seed(1)) if z else None
    tau = torch.rand(200, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 1e-2
    rc = popcomp.greedy_select(S, 120, tau=tau, theta=theta, Z=Z)
    rg = popcomp.greedy_select(S.cuda(), 120, tau=tau.cuda(), theta=theta, Z=None if Z is None else Z.cuda())
    n = 120 if dtype == torch.float64 else 40
    assert rg.indices.cpu()[:n].tolist() == rc.indices[:n].tolist()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(rg.objective.cpu()[:n], rc.objective[:n], rtol=tol, atol=tol)


def test_accumulate_does_not_check_finiteness_non_finite_values_propagate(devices):
    # documented contract: no NaN/Inf check on x (a second pass); the caller checks acc once
    x = torch.randn(20, 5, dtype=torch.float64)
    x[7, 2] = float("nan")
    acc, count = popcomp.covariance_accumulate(x.to(devices), dtype=torch.float64)
    acc = acc.cpu()
    assert int(count) == 20 and torch.isnan(acc[2, 2]) and not torch.isfinite(acc).all()
    good = torch.cat([x[:, :2], x[:, 3:]], 1)
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(acc[keep][:, keep], good.T @ good)  # other units unaffected
    # the squares of finite float32 activations beyond ~1.8e19 overflow a float32 accumulator
    acc, _ = popcomp.covariance_accumulate(torch.full((3, 2), 1e20, device=devices), dtype=torch.float32)
    assert torch.isinf(acc).all()
    acc = popcomp.CovarianceAccumulator(dtype=torch.float64)
    acc.update(x.to(devices))
    assert not torch.isfinite(acc.covariance()).all()
