"""CUDA backend of popcomp::kmeans1d against the CPU backend (same seed, same inputs) and
against the float64 pure-torch reference. Skipped without a CUDA build and device."""
import pytest
import torch

import popcomp
from popcomp._reference.kmeans import kmeans1d_reference

if not popcomp.backends()["cuda"]["usable"]:
    pytest.skip("needs a CUDA device and a CUDA build", allow_module_level=True)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def op(x, w, k, beta=0.0, method="lloyd", init="kmeans++", init_centers=None, max_iter=300,
       tol=0.0, seed=1234, diameter="squared"):
    return torch.ops.popcomp.kmeans1d(x, w, k, beta, method, init, init_centers, max_iter, tol,
                                      seed, diameter)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["lloyd", "exact"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_rows_match_cpu(dtype, method, beta, weighted):
    x, w = data(8, 300, dtype, 1, weighted)
    cpu, gpu = both(x, w, 5, beta=beta, method=method)
    assert_same(cpu, gpu)


@pytest.mark.parametrize("init", ["kmeans++", "linear", "quantile"])
@pytest.mark.parametrize("diameter", ["squared", "linear"])
def test_inits_and_diameters(init, diameter):
    x, w = data(6, 500, torch.float32, 2)
    cpu, gpu = both(x, w, 7, beta=0.3, init=init, diameter=diameter)
    assert_same(cpu, gpu)


def test_given_init():
    x, w = data(4, 200, torch.float64, 3)
    ic = torch.linspace(-1, 1, 6, dtype=torch.float64).expand(4, 6).contiguous()
    cpu, gpu = both(x, w, 6, init="given", init_centers=ic, beta=0.1)
    assert_same(cpu, gpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["lloyd", "exact"])
def test_single_large_problem(dtype, method):
    n = (1 << 18) if method == "lloyd" else (1 << 15)
    x, w = data(1, n, dtype, 4)
    cpu, gpu = both(x, w, 16, method=method, max_iter=100)
    assert_same(cpu, gpu, label_frac=0.9999)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_long_rows(dtype):  # the (row, key) composite sort path: n >= 65536, rows > 1
    x, w = data(3, 70000, dtype, 5)
    cpu, gpu = both(x, w, 8, method="exact")
    assert_same(cpu, gpu, label_frac=0.9999)
    cpu, gpu = both(x, None, 8, method="lloyd", max_iter=50)
    assert_same(cpu, gpu, label_frac=0.9999)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_rows_exact(dtype):
    x, w = data(256, 1024, dtype, 6)
    cpu, gpu = both(x, w, 16, method="exact")
    assert_same(cpu, gpu)


@pytest.mark.parametrize("method", ["lloyd", "exact"])
def test_ties_and_zero_weights(method):
    x, w = data(5, 400, torch.float64, 7, zero_frac=0.3, levels=12)
    cpu, gpu = both(x, w, 6, method=method)
    assert_same(cpu, gpu)


@pytest.mark.parametrize("method", ["lloyd", "exact"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_edge_cases(method, beta):
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


def test_against_reference_small():
    for seed in range(10):
        x, w = data(3, 40, torch.float64, 100 + seed, zero_frac=0.2)
        for method in ("lloyd", "exact"):
            for beta in (0.0, 0.2):
                ref = kmeans1d_reference(x, w, 4, beta, method, "linear", None, 300, 0.0, 0,
                                         "squared")
                gpu = op(x.cuda(), w.cuda(), 4, beta=beta, method=method, init="linear")
                torch.testing.assert_close(gpu[0].cpu(), ref[0], rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(gpu[2].cpu(), ref[2], rtol=1e-8, atol=1e-10)
                assert torch.equal(gpu[1].cpu().long(), ref[1].long())


def test_signed_zero_is_one_value():  # torch.unique (the reference) merges -0.0 and +0.0
    x = torch.tensor([[-0.0, 0.0, 1.0, 1.0, 2.0]], dtype=torch.float32)
    ref = kmeans1d_reference(x, None, 3, 0.0, "exact", "kmeans++", None, 300, 0.0, 0, "squared")
    gpu = op(x.cuda(), None, 3, method="exact")
    torch.testing.assert_close(gpu[0].cpu(), ref[0])
    assert torch.equal(gpu[1].cpu().long(), ref[1].long())


def test_public_api_and_stream():
    x, w = data(4, 1000, torch.bfloat16, 9)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        r = popcomp.kmeans1d(x.cuda(), 8, w.cuda(), method="exact", beta=0.1)
    s.synchronize()
    c = popcomp.kmeans1d(x, 8, w, method="exact", beta=0.1)
    torch.testing.assert_close(r.centers.cpu(), c.centers, rtol=1e-6, atol=1e-6)
    assert torch.equal(r.labels.cpu(), c.labels)


def test_bad_inputs_cuda():
    x = torch.randn(2, 10, device="cuda")
    with pytest.raises(ValueError):
        popcomp.kmeans1d(torch.full((10,), float("nan"), device="cuda"), 2)
    with pytest.raises(ValueError):
        popcomp.kmeans1d(x, 2, -torch.ones_like(x))
    with pytest.raises(ValueError):
        popcomp.kmeans1d(x, 2, torch.zeros_like(x))
    with pytest.raises(ValueError):
        popcomp.kmeans1d(x, 0)


def test_workspace_bound_is_enough():
    C = popcomp._backend.compiled()
    for rows, n, k, method, dt in [(1, 1, 1, 0, 1), (4096, 4096, 16, 1, 2), (1, 10**6, 16, 0, 0)]:
        assert C.kmeans1d_cuda_workspace(rows, n, k, method, dt) > 0
