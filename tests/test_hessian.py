"""popcomp.hessian and the fused op popcomp::sumsq_outer_acc against independent oracles:
float64 per-sample autograd loops (Fisher), torch.autograd.functional.hessian (GGN on
piecewise-linear nets, Hutchinson), and a 2-process gloo run (all-reduce)."""
import os
import socket

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import popcomp.hessian as H
from popcomp._backend import compiled
from popcomp._model import eval_mode
from popcomp.hessian.losses import loss_factor
from popcomp.ops.backends.reference.sumsq_outer_acc import sumsq_outer_acc_reference


# ---- oracles ---------------------------------------------------------------------------------
def fisher_oracle(model, loss_fn, X, Y):
    """sum_s (d l_s / d w)^2 with l_s = loss_fn on the batch holding sample s alone (float64),
    for the trainable parameters."""
    m = _double(model)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    res = {n: torch.zeros_like(p) for n, p in named}
    for s in range(X.shape[0]):
        xs = X[s : s + 1]
        xs = xs.double() if xs.is_floating_point() else xs
        ys = Y[s : s + 1]
        ys = ys.double() if ys.is_floating_point() else ys
        gs = torch.autograd.grad(loss_fn(m(xs), ys), [p for _, p in named])
        for (n, _), g in zip(named, gs):
            res[n] += g**2
    return res


def hessian_diag_oracle(model, loss_fn, X, Y, scale):
    """Exact diagonal of the Hessian of scale * loss_fn(model(X), Y) (float64)."""
    m = _double(model)
    names = [n for n, _ in m.named_parameters()]
    ps = [p.detach() for _, p in m.named_parameters()]
    Xd = X.double() if X.is_floating_point() else X
    Yd = Y.double() if Y.is_floating_point() else Y
    res = {}
    for i, n in enumerate(names):
        def f(pi, i=i):
            d = dict(zip(names, ps))
            d[names[i]] = pi
            return loss_fn(functional_call(m, d, (Xd,)), Yd) * scale

        Hm = torch.autograd.functional.hessian(f, ps[i])
        k = ps[i].numel()
        res[n] = Hm.reshape(k, k).diagonal().reshape(ps[i].shape)
    return res


def _double(model):
    import copy

    return copy.deepcopy(model).double()


def rel_err(h, ref):
    assert set(h) == set(ref), (sorted(h), sorted(ref))
    num = sum(((h[k].double() - ref[k]) ** 2).sum() for k in ref)
    den = sum((ref[k] ** 2).sum() for k in ref)
    return float((num / den).sqrt())


def assert_close_maps(h, ref, tol=1e-5):
    assert set(h) == set(ref)
    for k in ref:
        assert h[k].dtype == torch.float32 and h[k].shape == ref[k].shape
        torch.testing.assert_close(h[k].double(), ref[k], rtol=tol, atol=tol * float(ref[k].abs().max()))


# ---- the fused op ----------------------------------------------------------------------------
@pytest.mark.parametrize("B,R,T,o,i", [(5, 1, 1, 70, 130), (3, 2, 7, 65, 3), (4, 3, 1, 10, 100), (2, 1, 9, 33, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cpu_path", ["kernel", "bmm"])
def test_sumsq_op_matches_reference(B, R, T, o, i, dtype, devices, cpu_path, monkeypatch):
    # on CPU, T > 1 takes the compiled kernel or torch's batched GEMM (small out x in): both;
    # float64 operands accumulate into a float64 acc (the float64 kernels on CPU and CUDA)
    from popcomp.ops.backends.cpu import sumsq_outer_acc as impl

    if cpu_path == "bmm" and (devices != "cpu" or T == 1):
        pytest.skip("the batched-GEMM path is CPU, T > 1")
    monkeypatch.setattr(impl, "_prefer_bmm", lambda *a: cpu_path == "bmm")
    torch.manual_seed(0)
    f64 = dtype == torch.float64
    adt = torch.float64 if f64 else torch.float32
    g = torch.randn(B, R, T, o).to(dtype).to(devices)
    x = torch.randn(B, T, i).to(dtype).to(devices)
    a = torch.rand(o, i, device=devices).to(adt)
    b = a.clone()
    torch.ops.popcomp.sumsq_outer_acc(a, g, x)
    sumsq_outer_acc_reference(b, g, x)
    rtol = 1e-12 if f64 else 1e-5
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))
    # float64 definition (the ops add to what acc held)
    m = torch.einsum("brto,bti->broi", g.double(), x.double()).square().sum((0, 1))
    c = torch.zeros(o, i, device=devices, dtype=adt)
    torch.ops.popcomp.sumsq_outer_acc(c, g, x)
    rtol = 1e-12 if f64 else 1e-4
    torch.testing.assert_close(c.double(), m, rtol=rtol, atol=(1e-12 if f64 else 1e-5) * float(m.abs().max()))


def test_sumsq_op_definition_and_strides(devices):
    torch.manual_seed(1)
    g = torch.randn(3, 2, 5, 8, device=devices).permute(0, 1, 3, 2)  # (3, 2, 8, 5), non-contiguous
    x = torch.randn(3, 7, 8, device=devices).transpose(1, 2)  # (3, 8, 7)
    acc = torch.zeros(5, 7, device=devices)
    torch.ops.popcomp.sumsq_outer_acc(acc, g, x)
    ref = torch.einsum("brto,bti->broi", g.double(), x.double()).square().sum((0, 1))
    torch.testing.assert_close(acc.double(), ref, rtol=1e-5, atol=1e-6)


def test_sumsq_op_t1_in_chunks_of_samples(monkeypatch):
    # T == 1 on CPU is a GEMM over bounded chunks of samples: several chunks, strided g
    from popcomp.ops.backends.cpu import sumsq_outer_acc as impl

    monkeypatch.setattr(impl, "_GEMM_CHUNK_FLOATS", 3 * (3 * 6 + 7))  # 3 samples per chunk
    torch.manual_seed(2)
    g = torch.randn(3, 10, 1, 6).transpose(0, 1)  # (B=10, R=3, 1, 6), R-major in memory
    x = torch.randn(10, 1, 7)
    acc = torch.ones(6, 7)
    torch.ops.popcomp.sumsq_outer_acc(acc, g, x)
    ref = 1 + torch.einsum("brto,bti->broi", g.double(), x.double()).square().sum((0, 1))
    torch.testing.assert_close(acc.double(), ref, rtol=1e-5, atol=1e-6)


def test_sumsq_op_opcheck_and_errors(devices):
    kw = {"device": devices}
    torch.library.opcheck(torch.ops.popcomp.sumsq_outer_acc.default,
                          (torch.zeros(5, 7, **kw), torch.randn(3, 2, 4, 5, **kw), torch.randn(3, 4, 7, **kw)))
    torch.library.opcheck(torch.ops.popcomp.sumsq_outer_acc.default,
                          (torch.zeros(6, 3, **kw), torch.randn(4, 1, 1, 6, **kw), torch.randn(4, 1, 3, **kw)))
    with pytest.raises(ValueError, match="acc"):
        torch.ops.popcomp.sumsq_outer_acc(torch.zeros(5, 6, **kw), torch.randn(3, 1, 4, 5, **kw),
                                          torch.randn(3, 4, 7, **kw))
    with pytest.raises(ValueError, match="B or T"):
        torch.ops.popcomp.sumsq_outer_acc(torch.zeros(5, 7, **kw), torch.randn(3, 1, 4, 5, **kw),
                                          torch.randn(2, 4, 7, **kw))


@pytest.mark.parametrize("B,R,T,o,i", [(300, 1, 1, 70, 130), (3, 2, 37, 65, 3), (1000, 3, 1, 10, 100), (5, 1, 300, 129, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sumsq_op_cpu_equals_cuda(B, R, T, o, i, dtype, cuda_device):
    # (opcheck on CUDA: test_sumsq_op_opcheck_and_errors); float64: acc, g and x float64, the
    # CUDA float64 kernel (the sample splits included: few output tiles here) against the CPU's
    torch.manual_seed(0)
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    rtol, atol = (1e-12, 1e-13) if dtype == torch.float64 else (1e-4, 1e-5)
    g = torch.randn(B, R, T, o).to(dtype)
    x = torch.randn(B, T, i).to(dtype)
    a = torch.rand(o, i, dtype=adt)
    c = a.to(cuda_device)
    torch.ops.popcomp.sumsq_outer_acc(a, g, x)
    torch.ops.popcomp.sumsq_outer_acc(c, g.to(cuda_device), x.to(cuda_device))
    assert c.dtype == adt
    torch.testing.assert_close(c.cpu(), a, rtol=rtol, atol=atol * float(a.abs().max()))
    # strided (conv-like) operands
    gt = g.transpose(2, 3).contiguous().transpose(2, 3)
    c2 = torch.zeros(o, i, device=cuda_device, dtype=adt)
    a2 = torch.zeros(o, i, dtype=adt)
    torch.ops.popcomp.sumsq_outer_acc(c2, gt.to(cuda_device), x.to(cuda_device))
    torch.ops.popcomp.sumsq_outer_acc(a2, gt, x)
    torch.testing.assert_close(c2.cpu(), a2, rtol=rtol, atol=atol * float(a2.abs().max()))
    if dtype == torch.float64:  # the float64 kernel, not the reference: repeated runs agree bit for bit
        c3 = torch.zeros(o, i, device=cuda_device, dtype=adt)
        torch.ops.popcomp.sumsq_outer_acc(c3, gt.to(cuda_device), x.to(cuda_device))
        assert torch.equal(c3, c2)


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sumsq_op_cuda_more_than_65535_row_tiles(T, dtype, cuda_device):
    # 65535 * 64 + 70 output rows: 65537 tiles of 64 rows, past the gridDim.y limit (it raised)
    o, i, B = 65535 * 64 + 70, 3, 2
    torch.manual_seed(0)
    g = torch.randn(B, 1, T, o, device=cuda_device, dtype=dtype)
    x = torch.randn(B, T, i, device=cuda_device, dtype=dtype)
    c = torch.zeros(o, i, device=cuda_device, dtype=dtype)
    torch.ops.popcomp.sumsq_outer_acc(c, g, x)
    want = (torch.einsum("brto,bti->broi", g.double(), x.double()) ** 2).sum((0, 1))
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(c.double(), want, rtol=tol, atol=tol)
    assert bool((c[-70:] > 0).all())  # the rows of the last tiles were written


_CORE = compiled()


@pytest.mark.skipif(_CORE is None or not _CORE.has_cuda, reason="CUDA bindings not built")
@pytest.mark.parametrize("g_dtype, x_dtype, acc_dtype, match", [
    (1, 1, 2, r"acc_dtype must be a dtype code in \{0 float64, 1 float32\}"),
    (1, 0, 0, r"g_dtype must be a dtype code in \{0 float64\}"),  # a float64 acc: float64 g, x
    (0, 1, 0, r"x_dtype must be a dtype code in \{0 float64\}"),
    (0, 0, 1, r"g_dtype must be a dtype code in \{1 float32"),  # a float32 acc: no float64
])
def test_sumsq_cuda_binding_checks_the_dtypes(g_dtype, x_dtype, acc_dtype, match):
    # the raw binding checks its codes before any device call (no GPU needed)
    # sumsq_outer_cuda(g, x, acc, B, R, T, out, in, g_strides, x_strides, g_dtype, x_dtype,
    #                  device, stream, workspace, workspace_bytes, acc_dtype)
    with pytest.raises(ValueError, match=f"sumsq_outer_cuda: .*{match}"):
        _CORE.sumsq_outer_cuda(1, 1, 1, 1, 1, 1, 1, 1, (1, 1, 1, 1), (1, 1, 1), g_dtype, x_dtype,
                               0, 0, 0, 0, acc_dtype)


def test_diagonal_cpu_equals_cuda(cuda_device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    X, Y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    for method in ("fisher", "ggn"):
        hc = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], method, progress=False)
        hg = H.diagonal(model.to(cuda_device), nn.CrossEntropyLoss(), [(X, Y)], method, progress=False)
        model.cpu()
        for k in hc:
            torch.testing.assert_close(hg[k].cpu(), hc[k], rtol=1e-4, atol=1e-6 * float(hc[k].abs().max()))


# ---- Fisher ----------------------------------------------------------------------------------
def test_fisher_linear_T1_batches_and_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5))
    X, Y = torch.randn(20, 7), torch.randint(0, 5, (20,))
    data = [(X[:8], Y[:8]), (X[8:], Y[8:])]
    h = H.diagonal(model, nn.CrossEntropyLoss(), data, progress=False)
    assert h.num_samples == 20
    ref = fisher_oracle(model, nn.CrossEntropyLoss(), X, Y)
    assert_close_maps(h, ref)
    hm = H.diagonal(model, nn.CrossEntropyLoss(), data, mean=True, progress=False)
    assert_close_maps(hm, {k: v / 20 for k, v in ref.items()})
    # the same with a sum-reduced loss and a plain callable (reduction probed)
    h2 = H.diagonal(model, lambda o, y: nn.functional.cross_entropy(o, y, reduction="sum"), data,
                    progress=False)
    assert_close_maps(h2, ref)


def test_fisher_linear_sequences_T_gt_1():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))
    X, Y = torch.randn(10, 5, 6), torch.randn(10, 5, 4)
    for red in ("mean", "sum"):
        h = H.diagonal(model, nn.MSELoss(reduction=red), [(X[:4], Y[:4]), (X[4:], Y[4:])], progress=False)
        assert_close_maps(h, fisher_oracle(model, nn.MSELoss(reduction=red), X, Y))


def test_fisher_conv2d_stride_padding_groups_and_conv1d():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(6, 4, 2, dilation=2, padding=1, padding_mode="reflect"), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )
    X, Y = torch.randn(6, 4, 9, 9), torch.randint(0, 3, (6,))
    h = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], progress=False)
    assert_close_maps(h, fisher_oracle(model, nn.CrossEntropyLoss(), X, Y))
    model = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(28, 2))
    X, Y = torch.randn(5, 3, 11), torch.randn(5, 2)
    h = H.diagonal(model, nn.MSELoss(), [(X, Y)], progress=False)
    assert_close_maps(h, fisher_oracle(model, nn.MSELoss(), X, Y))


class _EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(11, 4, padding_idx=0)
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        return self.l(self.e(x)).sum(1)


class _ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.c1(x))
        out = self.c2(out)
        out += x  # in-place on a tracked output
        return self.relu(out)


def test_fisher_embedding_resblock_and_reuse():
    torch.manual_seed(0)
    model = _EmbNet()
    X, Y = torch.randint(0, 11, (7, 6)), torch.randint(0, 3, (7,))
    h = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], progress=False)
    assert_close_maps(h, fisher_oracle(model, nn.CrossEntropyLoss(), X, Y))
    model = nn.Sequential(nn.Conv2d(2, 3, 1), _ResBlock(3), nn.Flatten(), nn.Linear(3 * 16, 4))
    X, Y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    h = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], progress=False)
    assert_close_maps(h, fisher_oracle(model, nn.CrossEntropyLoss(), X, Y))
    lin = nn.Linear(4, 4)  # one module called twice: per-sample gradients add up before squaring
    model = nn.Sequential(lin, nn.Tanh(), lin)
    X, Y = torch.randn(6, 4), torch.randn(6, 4)
    h = H.diagonal(model, nn.MSELoss(), [(X, Y)], progress=False)
    assert_close_maps(h, fisher_oracle(model, nn.MSELoss(), X, Y))


def test_accumulator_streams():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    X, Y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    acc = H.HessianAccumulator(model, nn.CrossEntropyLoss())
    acc.update(X[:5], Y[:5])
    r1 = acc.result()
    assert r1.num_samples == 5
    acc.accumulate([(X[5:], Y[5:])], progress=False)
    r2 = acc.result()
    assert r2.num_samples == 12 and r1.num_samples == 5
    assert_close_maps(r2, fisher_oracle(model, nn.CrossEntropyLoss(), X, Y))
    assert_close_maps(r1, fisher_oracle(model, nn.CrossEntropyLoss(), X[:5], Y[:5]))


# ---- GGN -------------------------------------------------------------------------------------
def _relu_net():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


@pytest.mark.parametrize("loss", ["ce", "mse", "bce_sum"])
def test_ggn_equals_hessian_diag_on_relu_nets(loss):
    torch.manual_seed(1)
    model = _relu_net()
    X = torch.randn(12, 5)
    if loss == "ce":
        lf, Y, scale = nn.CrossEntropyLoss(), torch.randint(0, 4, (12,)), 12
    elif loss == "mse":
        lf, Y, scale = nn.MSELoss(), torch.randn(12, 4), 12
    else:
        lf, Y, scale = nn.BCEWithLogitsLoss(reduction="sum"), torch.rand(12, 4).round(), 1
    h = H.diagonal(model, lf, [(X[:7], Y[:7]), (X[7:], Y[7:])], method="ggn", progress=False)
    assert_close_maps(h, hessian_diag_oracle(model, lf, X, Y, scale), tol=1e-4)


def test_ggn_conv_and_sequence_ce():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 9, 4))
    X, Y = torch.randn(6, 2, 5, 5), torch.randint(0, 4, (6,))
    h = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], method="ggn", progress=False)
    assert_close_maps(h, hessian_diag_oracle(model, nn.CrossEntropyLoss(), X, Y, 6), tol=1e-4)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).transpose(1, 2)  # (B, C, T)

    model = Seq()
    X, Y = torch.randn(6, 7, 3), torch.randint(0, 4, (6, 7))
    h = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], method="ggn", progress=False)
    assert_close_maps(h, hessian_diag_oracle(model, nn.CrossEntropyLoss(), X, Y, 6), tol=1e-4)
    # ggn_mc: unbiased, converges to ggn
    hm = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)] * 25, method="ggn_mc", mc_samples=32,
                    seed=0, progress=False)
    assert rel_err({k: v / 25 for k, v in hm.items()}, {k: v.double() for k, v in h.items()}) < 0.05


# ---- Hutchinson ------------------------------------------------------------------------------
def test_hutchinson_converges_to_exact_diagonal():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3))
    X, Y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    ex = hessian_diag_oracle(model, nn.CrossEntropyLoss(), X, Y, 10)
    errs = []
    for probes in (8, 2000):
        hh = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], method="hutchinson",
                        num_probes=probes, seed=0, progress=False)
        errs.append(rel_err(hh, ex))
    assert errs[1] < 0.2 and errs[1] < errs[0] / 4, errs


# ---- errors ----------------------------------------------------------------------------------
def test_errors():
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    X, Y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"LayerNorm.*hutchinson"):
        H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], progress=False)
    with pytest.raises(ValueError, match="data"):
        H.diagonal(_relu_net(), nn.CrossEntropyLoss(), [], progress=False)
    with pytest.raises(ValueError, match="method"):
        H.diagonal(_relu_net(), nn.CrossEntropyLoss(), [(X, Y)], method="newton", progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        H.diagonal(_relu_net(), nn.L1Loss(), [(torch.randn(4, 5), torch.randn(4, 4))], method="ggn",
                   progress=False)
    # frozen unsupported modules are fine
    model[1].requires_grad_(False)
    h = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], progress=False)
    assert set(h) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# ---- distributed -----------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, path):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
        X, Y = torch.randn(12, 5), torch.randint(0, 3, (12,))
        part = [(X[i : i + 2], Y[i : i + 2]) for i in range(2 * rank, 12, 4)]  # rank-strided batches
        h = H.diagonal(model, nn.CrossEntropyLoss(), part, method="fisher", progress=False)
        if rank == 0:
            torch.save({"h": dict(h), "n": h.num_samples}, path)
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "h.pt")
    mp.spawn(_dist_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    got = torch.load(path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    X, Y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    one = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], progress=False)
    assert got["n"] == 12
    for k in one:
        torch.testing.assert_close(got["h"][k], one[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_ggn_mc_unbiased_for_mse_and_bce(loss):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    X = torch.randn(8, 4)
    lf, Y = (nn.MSELoss(), torch.randn(8, 3)) if loss == "mse" else (nn.BCEWithLogitsLoss(), torch.rand(8, 3).round())
    exact = H.diagonal(model, lf, [(X, Y)], method="ggn", progress=False)
    mc = H.diagonal(model, lf, [(X, Y)] * 20, method="ggn_mc", mc_samples=64, seed=1, progress=False)
    assert mc.num_samples == 160
    assert rel_err({k: v / 20 for k, v in mc.items()}, {k: v.double() for k, v in exact.items()}) < 0.08


# ---- eval mode -------------------------------------------------------------------------------
def _dropout_bn_net():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    model[1].requires_grad_(False)  # frozen: fisher/ggn accumulate the Linear layers only
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_diagonal_evaluates_in_eval_mode_and_restores_modes(method):
    # dropout noise and BatchNorm batch statistics would pollute the estimate (and train-mode
    # BatchNorm would update its running statistics); the oracle is the model in eval mode
    model = _dropout_bn_net()
    model.train()
    model[4].eval()  # a module in its own mode keeps it
    X, Y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    stats = model[1].running_mean.clone()
    h = H.diagonal(model, nn.CrossEntropyLoss(), [(X[:6], Y[:6]), (X[6:], Y[6:])], method=method,
                   progress=False)
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]
    assert torch.equal(model[1].running_mean, stats)
    ref_model = _double(model).eval()
    if method == "fisher":
        ref = fisher_oracle(ref_model, nn.CrossEntropyLoss(), X, Y)
    else:
        ref = hessian_diag_oracle(ref_model, nn.CrossEntropyLoss(), X, Y, 10)
    assert_close_maps(h, {k: ref[k] for k in h}, tol=1e-4)


def test_diagonal_eval_mode_false_keeps_train_mode():
    model = _dropout_bn_net()
    model.train()
    X, Y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    stats = model[1].running_mean.clone()
    # the batch statistics couple the samples below the BatchNorm: layer 0 is refused
    with pytest.raises(ValueError, match=r"BatchNorm in training mode.*\['0'\].*eval_mode=True"):
        H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], method="ggn", eval_mode=False,
                   progress=False)
    H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], method="ggn", eval_mode=False, progress=False,
               params=["4.weight", "4.bias"])
    assert not torch.equal(model[1].running_mean, stats)  # train-mode BatchNorm ran
    assert all(m.training for m in model.modules())
    with pytest.raises(TypeError, match="eval_mode"):
        H.HessianAccumulator(model, nn.CrossEntropyLoss(), eval_mode="yes")


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_ce_loss_factor_has_rank_c_minus_1_and_squares_to_the_softmax_hessian(scale):
    # C - 1 columns per position whose outer products sum to diag(p) - p p^T (the CE Hessian
    # in the logits), also when the softmax saturates (scale 40) on any class, the last included
    torch.manual_seed(5)
    B, C, P = 6, 5, 3
    logits = torch.randn(B, C, P, dtype=torch.float64) * scale
    logits[0, -1] += 100.0
    A = loss_factor(nn.CrossEntropyLoss(reduction="sum"), "ggn").exact(
        logits.float(), torch.zeros(B, P, dtype=torch.long))
    assert A.shape == ((C - 1) * P, B, C, P)
    got = torch.einsum("rbip,rbjq->bpiqj", A.double(), A.double())
    p = torch.softmax(logits, 1).permute(0, 2, 1)  # (B, P, C)
    hess = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # (B, P, C, C)
    ref = torch.einsum("bpij,pq->bpiqj", hess, torch.eye(P, dtype=torch.float64))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


# ---- the chain fast path (Sequential of Linear / elementwise layers, no autograd) ---------------
def _generic(model, lf, data, method, **kw):
    """The same accumulation forced onto the generic autograd path (a container hook)."""
    h = model.register_forward_hook(lambda *a: None)
    try:
        acc = H.HessianAccumulator(model, lf, method, **kw)
        with eval_mode(model):
            assert not acc._estimator.chain.ready(data[0][0])
        return acc.accumulate(data, progress=False).result()
    finally:
        h.remove()


def _chain_net():
    torch.manual_seed(6)
    inner = nn.Sequential(nn.Linear(6, 7), nn.GELU(), nn.Dropout(0.3))
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 6), nn.Tanh(), inner, nn.Identity(),
                         nn.Linear(7, 5), nn.LeakyReLU(0.1), nn.ReLU(inplace=True), nn.Linear(5, 4))


@pytest.mark.parametrize("method", ["fisher", "ggn", "ggn_mc"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_chain_equals_generic_path(method, loss):
    model = _chain_net()
    model.train()  # dropout off through eval mode
    X = torch.randn(9, 2, 3)
    lf, Y = {"ce": (nn.CrossEntropyLoss(), torch.randint(0, 4, (9,))),
             "mse": (nn.MSELoss(reduction="sum"), torch.randn(9, 4)),
             "bce": (nn.BCEWithLogitsLoss(), torch.rand(9, 4).round())}[loss]
    data = [(X[:4], Y[:4]), (X[4:], Y[4:])]
    acc = H.HessianAccumulator(model, lf, method, seed=3, mc_samples=2)
    with eval_mode(model):
        assert acc._estimator.chain.ready(X)
    fast = acc.accumulate(data, progress=False).result()
    ref = _generic(model, lf, data, method, seed=3, mc_samples=2)
    assert not any(v.requires_grad for v in list(fast.values()) + list(ref.values()))
    assert set(fast) == {f"{i}.{p}" for i in ("1", "3.0", "5", "8") for p in ("weight", "bias")}
    assert_close_maps(fast, {k: v.double() for k, v in ref.items()}, tol=1e-5)
    if method == "fisher":
        assert_close_maps(fast, fisher_oracle(model.eval(), lf, X, Y), tol=1e-4)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_chain_ggn_equals_hessian_on_relu_sequences_and_subsets(loss):
    # inputs (B, T, in): the per-sample Jacobian sums over positions; a params subset stops the
    # backprop at the lowest selected layer and passes through unselected ones
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    X = torch.randn(5, 3, 3)
    if loss == "ce":  # CE on (B, T, C) logits is per position: flatten positions into samples
        X = X.reshape(15, 3)
        lf, Y, scale = nn.CrossEntropyLoss(), torch.randint(0, 4, (15,)), 15
    else:
        lf, Y, scale = nn.MSELoss(), torch.randn(5, 3, 4), 5
    acc = H.HessianAccumulator(model, lf, "ggn")
    assert acc._estimator.chain.ready(X)
    h = acc.accumulate([(X, Y)], progress=False).result()
    assert_close_maps(h, hessian_diag_oracle(model, lf, X, Y, scale), tol=1e-4)
    sub = H.diagonal(model, lf, [(X, Y)], method="ggn", params=["2.weight"], progress=False)
    assert set(sub) == {"2.weight"}
    torch.testing.assert_close(sub["2.weight"], h["2.weight"], rtol=1e-5, atol=1e-7)


def test_models_outside_the_chain_take_the_generic_path():
    lin = nn.Linear(4, 4)
    for model in (nn.Sequential(nn.Conv2d(2, 3, 1), _ResBlock(3), nn.Flatten(), nn.Linear(3 * 16, 4)),
                  nn.Sequential(lin, nn.Tanh(), lin),  # a layer used twice
                  nn.Sequential(nn.Linear(4, 4), nn.Softmax(1)),  # not elementwise
                  nn.Sequential(nn.Flatten(0), nn.Linear(4, 4)),
                  nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten()),
                  nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.Flatten())):
        assert H.HessianAccumulator(model, nn.MSELoss(), "ggn")._estimator.chain is None
    # a chain in train mode with active dropout takes the generic path (and is right there)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Dropout(0.0), nn.Linear(6, 3))
    X, Y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    acc = H.HessianAccumulator(model, nn.CrossEntropyLoss(), "ggn", eval_mode=False)
    model[2].p = 0.5
    assert not acc._estimator.chain.ready(X)
    model[2].p = 0.0
    assert acc._estimator.chain.ready(X)
    bn = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False).eval(),
                       nn.Linear(6, 3))  # batch statistics even in eval mode
    assert not H.HessianAccumulator(bn, nn.CrossEntropyLoss(), "ggn", params=["0.weight"])._estimator.chain.ready(X)
    h = acc.accumulate([(X, Y)], progress=False).result()
    assert_close_maps(h, hessian_diag_oracle(model, nn.CrossEntropyLoss(), X, Y, 8), tol=1e-4)


@pytest.mark.parametrize("dim", [1, 2])
def test_chain_convolutions_equal_the_hessian_and_the_generic_path(dim):
    # stride with a dropped border (input size 9, kernel 2, stride 2), groups, dilation, padding
    torch.manual_seed(8)
    Conv = nn.Conv1d if dim == 1 else nn.Conv2d
    model = nn.Sequential(Conv(4, 6, 2, stride=2, groups=2), nn.ReLU(),
                          Conv(6, 4, 3, dilation=2, padding=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4**dim, 3))
    X, Y = torch.randn(5, 4, *([9] * dim)), torch.randint(0, 3, (5,))
    acc = H.HessianAccumulator(model, nn.CrossEntropyLoss(), "ggn")
    assert acc._estimator.chain.ready(X)
    h = acc.accumulate([(X, Y)], progress=False).result()
    assert_close_maps(h, hessian_diag_oracle(model, nn.CrossEntropyLoss(), X, Y, 5), tol=1e-4)
    ref = _generic(model, nn.CrossEntropyLoss(), [(X, Y)], "ggn")
    assert_close_maps(h, {k: v.double() for k, v in ref.items()}, tol=1e-5)
    f = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], progress=False)
    assert_close_maps(f, fisher_oracle(model, nn.CrossEntropyLoss(), X, Y), tol=1e-4)


class _NumpySquare(torch.autograd.Function):
    """x * x with a backward through numpy: no batching rule, so no vmapped backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * torch.from_numpy(g.detach().numpy())


class _SquareNet(nn.Module):  # generic path; the square after the first layer
    def __init__(self, numpy_square):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.numpy_square = numpy_square

    def forward(self, x):
        h = self.a(x)
        h = _NumpySquare.apply(h) if self.numpy_square else h * h
        return self.c(torch.tanh(self.b(torch.tanh(h))))


@pytest.mark.parametrize("method", ["ggn", "ggn_mc"])
def test_generic_path_without_a_batching_rule_backprops_column_by_column(method):
    # the vmapped backward fails past the layers above the square (their part of the graph
    # freed by then): the columns go one by one through the kept graph, on every batch
    torch.manual_seed(0)
    ref_model, model = _SquareNet(False), _SquareNet(True)
    model.load_state_dict(ref_model.state_dict())
    X, Y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    data = [(X[:3], Y[:3]), (X[3:], Y[3:])]
    kw = dict(seed=0, mc_samples=3)
    acc = H.HessianAccumulator(model, nn.CrossEntropyLoss(), method, **kw)
    h = acc.accumulate(data, progress=False).result()
    assert acc._estimator._batched is False  # tried once, then column by column
    ref = H.HessianAccumulator(ref_model, nn.CrossEntropyLoss(), method, **kw)
    ref = ref.accumulate(data, progress=False).result()
    for k in ref:
        torch.testing.assert_close(h[k], ref[k], rtol=1e-5, atol=1e-7)


def test_chain_does_not_scale_the_loss_gradient_in_place():
    # d/do (o - y).sum() is an expanded (stride 0) tensor of ones: no in-place product on it
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    X, Y = torch.randn(6, 4), torch.randn(6, 3)
    loss = lambda o, y: (o - y).sum()  # noqa: E731
    h = H.diagonal(model, loss, [(X, Y)], reduction="sum", progress=False)
    assert_close_maps(h, fisher_oracle(model, loss, X, Y))


# ---- real-model interfaces: filter_fn, batches, output_fn (issue 16) ---------------------------
class _KwModel(nn.Module):
    """A model taking keyword arguments and returning a dict (like a Hugging Face model), with
    a LayerNorm no method but hutchinson supports."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x, scale=None):
        h = self.norm(torch.tanh(self.fc1(x)))
        if scale is not None:
            h = h * scale
        return {"logits": self.fc2(h), "hidden": h}


class _Plain(nn.Module):
    """_KwModel as a plain tensor -> logits model (for the oracles)."""

    def __init__(self, m, scale):
        super().__init__()
        self.m, self.scale = m, scale

    def forward(self, x):
        return self.m(x, scale=self.scale)["logits"]


def test_filter_fn_selects_modules_and_leaves_the_others_alone():
    torch.manual_seed(0)
    model = _KwModel()
    X, Y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"norm \(LayerNorm\).*filter_fn="):
        H.diagonal(model, ce, [(X, Y)], progress=False)
    lin = lambda m, n: isinstance(m, nn.Linear)  # noqa: E731
    h = H.diagonal(model, ce, [(X, Y)], filter_fn=lin, progress=False)  # default: .logits
    assert list(h) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    ref = fisher_oracle(_Plain(model, None), ce, X, Y)
    assert_close_maps(h, {k: ref["m." + k] for k in h})
    # filter_fn and params both restrict; keys are named_parameters names
    h2 = H.diagonal(model, ce, [(X, Y)], filter_fn=lambda m, n: n == "fc2", params=["fc2.weight"],
                    progress=False)
    assert list(h2) == ["fc2.weight"]
    torch.testing.assert_close(h2["fc2.weight"], h["fc2.weight"])
    # a selected module the method cannot handle is named
    with pytest.raises(ValueError, match=r"norm \(LayerNorm\).*change filter_fn"):
        H.diagonal(model, ce, [(X, Y)], filter_fn=lambda m, n: n in ("fc1", "norm"), progress=False)
    with pytest.raises(ValueError, match="filter_fn: nothing"):
        H.diagonal(model, ce, [(X, Y)], filter_fn=lambda m, n: False, progress=False)
    with pytest.raises(TypeError, match="filter_fn"):
        H.HessianAccumulator(model, ce, filter_fn="fc1")
    # hutchinson takes any selected module
    hh = H.diagonal(model, ce, [(X, Y)], method="hutchinson", filter_fn=lambda m, n: n == "norm",
                    progress=False, seed=0)
    assert list(hh) == ["norm.weight", "norm.bias"]


def test_params_in_any_order_and_repeated_are_accumulated_once_in_model_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, Y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    for method in H.METHODS:
        kw = dict(method=method, seed=0, progress=False)
        h = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)],
                       params=["2.weight", "0.weight", "2.weight"], **kw)
        ref = H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], params=["0.weight", "2.weight"],
                         **kw)
        assert list(h) == ["0.weight", "2.weight"], method
        for k in ref:
            torch.testing.assert_close(h[k], ref[k])


def test_tied_weight_selected_in_one_module_is_refused():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(8, 4), head)
    with pytest.raises(ValueError, match=r"0.weight is shared by the modules \['0', '3'\]"):
        H.HessianAccumulator(model, nn.CrossEntropyLoss(), filter_fn=lambda m, n: n == "3")
    acc = H.HessianAccumulator(model, nn.CrossEntropyLoss(), filter_fn=lambda m, n: n == "2")
    assert acc._estimator.names == ["2.weight", "2.bias"]


@pytest.mark.parametrize("method", ["fisher", "ggn", "hutchinson"])
def test_dict_and_tuple_batches_and_structured_outputs(method):
    torch.manual_seed(1)
    model = _KwModel()
    X, Y, S = torch.randn(6, 5), torch.randint(0, 3, (6,)), torch.rand(6, 8) + 0.5
    ce = nn.CrossEntropyLoss()
    lin = lambda m, n: isinstance(m, nn.Linear)  # noqa: E731
    kw = dict(method=method, filter_fn=lin, progress=False, seed=0, num_probes=3)
    by_dict = H.diagonal(model, ce, [({"x": X[:4], "scale": S[:4]}, Y[:4]),
                                     ({"x": X[4:], "scale": S[4:]}, Y[4:])], **kw)
    by_tuple = H.diagonal(model, ce, [((X[:4], S[:4]), Y[:4]), ((X[4:], S[4:]), Y[4:])], **kw)
    for k in by_dict:
        torch.testing.assert_close(by_tuple[k], by_dict[k])
    if method != "ggn":  # a custom loss seeing the whole dict output (the probe slices dicts)
        by_fn = H.diagonal(
            model, lambda o, y: nn.functional.cross_entropy(o["logits"], y, reduction="sum"),
            [({"x": X[:4], "scale": S[:4]}, Y[:4]), ({"x": X[4:], "scale": S[4:]}, Y[4:])],
            output_fn=lambda o: o, **kw)
        for k in by_dict:
            torch.testing.assert_close(by_fn[k], by_dict[k], rtol=1e-5, atol=1e-6)
    if method == "fisher":
        ref = {}
        for s in range(6):  # one sample at a time: its own scale row
            r = fisher_oracle(_Plain(model, S[s : s + 1]), ce, X[s : s + 1], Y[s : s + 1])
            ref = {k: ref.get(k, 0) + v for k, v in r.items()}
        assert_close_maps(by_dict, {k: ref["m." + k] for k in by_dict})


def test_output_fn_errors_and_inputs_alone():
    torch.manual_seed(2)

    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(x)
            return {"a": y, "b": 2 * y}

    model, X = TwoOut(), torch.randn(5, 4)
    with pytest.raises(TypeError, match=r"output_fn.*a \(5, 3\), b \(5, 3\)"):
        H.diagonal(model, None, [X], method="ggn", progress=False)
    with pytest.raises(TypeError, match="output_fn must return a tensor"):
        H.diagonal(model, None, [X], method="ggn", output_fn=lambda o: o["a"].tolist(), progress=False)
    # inputs alone: a tensor, a dict, (inputs,): the same label-free diagonal
    ha = H.diagonal(model, None, [X], method="ggn", output_fn=lambda o: o["a"], progress=False)
    hb = H.diagonal(model, None, [(X,)], method="ggn", output_fn=lambda o: o["a"], progress=False)
    hc = H.diagonal(model, None, [{"x": X}], method="ggn", output_fn=lambda o: o["a"], progress=False)
    hd = H.diagonal(model, None, [X], method="ggn", output_fn=lambda o: o["b"], progress=False)
    for k in ha:
        torch.testing.assert_close(hb[k], ha[k])
        torch.testing.assert_close(hc[k], ha[k])
        torch.testing.assert_close(hd[k], 4 * ha[k])  # J of 2f: 4 J^T J
    with pytest.raises(ValueError, match="data must yield"):
        H.diagonal(model, None, [(X, X, X)], method="ggn", progress=False)
    # a ModelOutput-like dataclass: its only tensor (None fields ignored); update() without target
    import dataclasses
    from typing import Optional

    @dataclasses.dataclass
    class Out:
        hidden: torch.Tensor
        attentions: Optional[torch.Tensor] = None

    class DC(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return Out(self.inner(x)["a"])

    acc = H.HessianAccumulator(DC(model), None, "ggn")
    acc.update(X[:2])
    acc.update(X[2:])
    he = acc.result()
    assert he.num_samples == 5
    for k in ha:
        torch.testing.assert_close(he["inner." + k], ha[k])


# ---- label-free: diag(J^T J) -------------------------------------------------------------------
def jtj_oracle(model, X):
    """sum_s diag(J_s^T J_s), J_s the Jacobian of sample s's outputs in the parameters
    (torch.func.jacrev, float64), and the variance of the one-probe Rademacher estimate per
    entry, summed over samples: sum_s 2 ((sum_j a_j^2)^2 - sum_j a_j^4), a_j = d f_{s,j} / d w."""
    m = _double(model)
    params = {n: p.detach() for n, p in m.named_parameters()}
    res = {n: torch.zeros_like(p) for n, p in params.items()}
    var = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in range(X.shape[0]):
        f = lambda p: functional_call(m, p, (X[s : s + 1].double(),)).reshape(-1)  # noqa: E731
        J = torch.func.jacrev(f)(params)
        for n in res:
            a2 = J[n] ** 2
            d = a2.sum(0)
            res[n] += d
            var[n] += 2 * (d**2 - (a2**2).sum(0))
    return res, var


class _Wrap(nn.Module):  # an own forward: takes the generic autograd path
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


@pytest.mark.parametrize("generic", [False, True])
def test_label_free_equals_jtj(generic):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    model = _Wrap(net) if generic else net
    X = torch.randn(9, 4)
    ref, var = jtj_oracle(model, X)
    exact = H.diagonal(model, None, [X[:5], X[5:]], method="ggn", progress=False)
    assert_close_maps(exact, ref)
    assert exact.num_samples == 9
    # probes: unbiased, within the Monte-Carlo standard error computed from the Jacobian
    M = 200
    for method in ("ggn_mc", "fisher"):
        est = H.diagonal(model, None, [X[:5], X[5:]], method=method, mc_samples=M, seed=1,
                         progress=False)
        zs = []
        for k in ref:
            se = (var[k] / M).sqrt()
            d = est[k].double() - ref[k]
            ok = se > 1e-9 * ref[k].abs().max()
            assert torch.allclose(d[~ok], torch.zeros_like(d[~ok]), atol=1e-4 * float(ref[k].abs().max()))
            zs.append(d[ok] / se[ok])
        z = torch.cat(zs)
        assert z.abs().max() < 5.5 and 0.3 < float((z**2).mean()) < 2.0, (method, z.abs().max())
    # hutchinson on the label-free loss: the Hessian at f = f0 is exactly J^T J
    hh = H.diagonal(model, None, [X], method="hutchinson", num_probes=1000, seed=0, progress=False)
    assert rel_err(hh, ref) < 0.25


def test_zero_fisher_warns_and_label_free_does_not():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    X = torch.randn(8, 4)
    with torch.no_grad():
        Y = model(X)  # "keep the outputs": MSE to the model's own outputs has zero gradient
    with pytest.warns(UserWarning, match=r"fisher diagonal is \(nearly\) zero.*loss_fn=None"):
        H.diagonal(model, nn.MSELoss(), [(X, Y)], progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = H.diagonal(model, None, [X], progress=False, seed=0)
        H.diagonal(model, nn.MSELoss(), [(X, Y + 1)], progress=False)
    assert all(float(v.min()) >= 0 for v in h.values()) and float(h["0.weight"].sum()) > 0


# ---- in-batch losses, wide outputs -----------------------------------------------------------
def _info_nce(z, partner):
    """InfoNCE over the batch: sample s's positive is sample partner[s], the others negatives."""
    zn = nn.functional.normalize(z, dim=1)
    sim = (zn @ zn.t() / 0.5).masked_fill(torch.eye(z.shape[0], dtype=torch.bool), -1e4)
    return nn.functional.cross_entropy(sim, partner)


def test_in_batch_loss_is_refused_by_per_sample_methods():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X, Y = torch.randn(6, 4), torch.tensor([1, 0, 3, 2, 5, 4])  # positive pairs
    # fails on one sample (the raw IndexError), or is neither a sum nor a mean
    spread = lambda z, y: torch.cdist(z, z).sum()  # noqa: E731
    for loss, msg in ((_info_nce, "fails on a batch holding one sample"), (spread, "neither")):
        with pytest.raises(ValueError, match=msg + r".*per-sample losses.*in-batch.*hutchinson"):
            H.diagonal(model, loss, [(X, Y)], method="fisher", progress=False)
    # the batch-level estimate: hutchinson with reduction="mean" is B x the batch loss Hessian
    hh = H.diagonal(model, _info_nce, [(X, Y)], method="hutchinson", reduction="mean",
                    num_probes=3000, seed=0, progress=False)
    ref = hessian_diag_oracle(model, _info_nce, X, Y, 6)
    assert rel_err(hh, ref) < 0.2


def test_ggn_on_wide_outputs_warns_with_guidance():
    model = nn.Sequential(nn.Linear(3, 300))
    X = torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"300 columns per sample.*ggn_mc"):
        H.diagonal(model, None, [X], method="ggn", progress=False)
    with pytest.raises(ValueError, match="loss_fn=None with method='ggn_mc'"):
        H.diagonal(model, None, [X], method="ggn", max_columns=100, progress=False)


# ---- hutchinson through fused attention ------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, 2)

    def forward(self, x):  # (B, T, d)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = nn.functional.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        return self.out(a.squeeze(1).mean(1))


def test_hutchinson_through_scaled_dot_product_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(6)
    model = _Attn()
    X, Y = torch.randn(4, 5, 8), torch.randint(0, 2, (4,))
    ce = nn.CrossEntropyLoss()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = hessian_diag_oracle(model, ce, X, Y, 4)
    hh = H.diagonal(model, ce, [(X, Y)], method="hutchinson", num_probes=3000, seed=0,
                    progress=False)
    assert rel_err(hh, ref) < 0.2
    c = hh.clamp()
    assert all(float(v.min()) >= 0 for v in c.values())
    assert any(float(v.min()) < 0 for v in hh.values())  # the raw estimate is left unclamped
    for k in hh:
        torch.testing.assert_close(c[k], hh[k].clamp(min=0))
