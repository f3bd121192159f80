"""Hessian parity with BackPACK (issue 14): Conv3d, ConvTranspose1d/2d/3d and BatchNorm1d/2d/3d
under fisher / ggn / ggn_mc against an independent per-sample autograd oracle (torch.func:
vmapped per-sample gradients, per-sample Jacobians and loss Hessians, float64) and, where
backpack-for-pytorch is installed, against BackPACK's SumGradSquared / DiagGGNExact; the
float64 path (a float64 model gets a float64 diagonal, agreeing to ~1e-12), the functional
losses under ggn, the frozen-parameter rule, and the Hessian-related error messages."""
import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev, vmap

import popcomp.hessian as H
from popcomp.ops.backends.reference.sumsq_outer_acc import sumsq_outer_acc_reference

F64 = torch.float64


# ---- oracles (float64, per sample, by torch.func) --------------------------------------------
def _call(model, params, x):
    return functional_call(model, (params, dict(model.named_buffers())), (x,))


def fisher_oracle(model, loss_fn, X, Y):
    """sum_s (d l_s / d w)^2, l_s the loss of the batch holding sample s alone (eval mode)."""
    m = copy.deepcopy(model).double().eval()
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

    def loss_s(p, x, y):
        return loss_fn(_call(m, p, x.unsqueeze(0)), y.unsqueeze(0))

    g = vmap(grad(loss_s), in_dims=(None, 0, 0))(params, X.double(), Y)
    return {n: (v**2).sum(0) for n, v in g.items()}


def ggn_oracle(model, loss_fn, X, Y):
    """sum_s diag(J_s^T H_s J_s): J_s the Jacobian of sample s's output in the parameters, H_s
    the Hessian of its loss in the output."""
    m = copy.deepcopy(model).double().eval()
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    res = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in range(X.shape[0]):
        x, y = X[s : s + 1].double(), Y[s : s + 1]
        out = _call(m, params, x)
        Hs = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
        J = jacrev(lambda p: _call(m, p, x))(params)
        for n, Jn in J.items():
            Jn = Jn.reshape(out.numel(), -1)
            res[n] += ((Hs @ Jn) * Jn).sum(0).reshape(params[n].shape)
    return res


def assert_maps(h, ref, rtol, dtype=None):
    assert set(h) == set(ref), (sorted(h), sorted(ref))
    for k in ref:
        if dtype is not None:
            assert h[k].dtype == dtype, (k, h[k].dtype)
        assert h[k].shape == ref[k].shape
        torch.testing.assert_close(h[k].double(), ref[k].double(), rtol=rtol,
                                   atol=rtol * float(ref[k].abs().max()))


# ---- the models BackPACK supports and popcomp refused before ---------------------------------
def _bn(bn, C):
    with torch.no_grad():  # nontrivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def make_model(kind, full=True):
    """(model, input shape of one sample): a Sequential ending in 3 logits (``full=False``:
    the grouped layers ungrouped and no output_padding, what BackPACK 1.7 handles)."""
    torch.manual_seed(0)
    gr = (lambda n: n) if full else (lambda n: 1)
    op = (lambda v: v) if full else (lambda v: 0)
    if kind == "conv3d":
        m = nn.Sequential(nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1),
                                    dilation=(1, 1, 2)), nn.ReLU(),
                          nn.Conv3d(4, 4, 2, groups=gr(2), bias=False), nn.Flatten(), nn.LazyLinear(3))
        shape = (2, 4, 5, 4)
    elif kind == "conv3d_pad_mode":
        m = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"), nn.Tanh(),
                          nn.Flatten(), nn.LazyLinear(3))
        shape = (2, 3, 4, 3)
    elif kind == "convT1d":
        m = nn.Sequential(nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=op(1)),
                          nn.ReLU(), nn.ConvTranspose1d(4, 2, 2, dilation=2, groups=gr(2)),
                          nn.Flatten(), nn.LazyLinear(3))
        shape = (3, 5)
    elif kind == "convT2d":
        m = nn.Sequential(nn.ConvTranspose2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0),
                                             output_padding=op((1, 0)), dilation=(1, 2)), nn.Sigmoid(),
                          nn.ConvTranspose2d(4, 4, 2, stride=2, groups=gr(4), bias=False),
                          nn.Flatten(), nn.LazyLinear(3))
        shape = (2, 3, 3)
    elif kind == "convT3d":
        m = nn.Sequential(nn.ConvTranspose3d(2, 2, 2, stride=(2, 1, 1), padding=(0, 1, 0)),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        shape = (2, 2, 3, 2)
    elif kind == "bn1d":
        m = nn.Sequential(nn.Linear(5, 6), _bn(nn.BatchNorm1d(6), 6), nn.ReLU(), nn.Linear(6, 3))
        shape = (5,)
    elif kind == "bn1d_seq":
        m = nn.Sequential(nn.Conv1d(2, 4, 3), _bn(nn.BatchNorm1d(4), 4), nn.Tanh(), nn.Flatten(),
                          nn.LazyLinear(3))
        shape = (2, 6)
    elif kind == "bn2d":
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(nn.BatchNorm2d(3), 3), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(3))
        shape = (2, 4, 4)
    elif kind == "bn3d":
        m = nn.Sequential(nn.Conv3d(2, 3, 2), _bn(nn.BatchNorm3d(3), 3), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(3))
        shape = (2, 3, 3, 3)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        m.eval()(torch.zeros(1, *shape))  # materialize the lazy layers
    return m.train().double(), shape


KINDS = ["conv3d", "conv3d_pad_mode", "convT1d", "convT2d", "convT3d", "bn1d", "bn1d_seq", "bn2d",
         "bn3d"]


def _data(shape, B=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=F64), torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_and_ggn_on_new_modules_equal_the_per_sample_oracle_in_float64(kind):
    model, shape = make_model(kind)
    X, Y = _data(shape)
    ce = nn.CrossEntropyLoss(reduction="sum")
    fisher = H.diagonal(model, ce, [(X[:3], Y[:3]), (X[3:], Y[3:])], method="fisher", progress=False)
    assert_maps(fisher, fisher_oracle(model, ce, X, Y), rtol=1e-10, dtype=F64)
    ggn = H.diagonal(model, ce, [(X, Y)], method="ggn", progress=False)
    assert_maps(ggn, ggn_oracle(model, ce, X, Y), rtol=1e-10, dtype=F64)


@pytest.mark.parametrize("kind", ["conv3d", "convT2d", "bn2d"])
def test_new_modules_in_float32_and_ggn_mc(kind):
    model, shape = make_model(kind)
    X, Y = _data(shape)
    m32 = copy.deepcopy(model).float()
    ce = nn.CrossEntropyLoss()  # a mean: the per-sample losses are its B-fold
    h = H.diagonal(m32, ce, [(X.float(), Y)], method="fisher", progress=False)
    assert_maps(h, fisher_oracle(model, ce, X, Y), rtol=2e-4, dtype=torch.float32)
    exact = H.diagonal(model, ce, [(X, Y)], method="ggn", progress=False)
    mc = H.diagonal(model, ce, [(X, Y)] * 40, method="ggn_mc", mc_samples=32, seed=0,
                    progress=False)
    num = sum(((mc[k] / 40 - exact[k]) ** 2).sum() for k in exact)
    den = sum((exact[k] ** 2).sum() for k in exact)
    assert float((num / den).sqrt()) < 0.1


@pytest.mark.parametrize("kind", ["bn1d", "bn2d", "bn3d"])
def test_batchnorm_in_training_mode_own_parameters_with_batch_statistics(kind):
    # eval_mode=False, BatchNorm on batch statistics: its own parameters get the exact
    # per-sample terms (the gradient of l_s with the batch's statistics); modules below it
    # are coupled through the statistics and refused
    model, shape = make_model(kind)
    X, Y = _data(shape, B=6)
    ce = nn.CrossEntropyLoss(reduction="sum")
    names = ["1.weight", "1.bias"]
    model.train()
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        H.diagonal(model, ce, [(X, Y)], eval_mode=False, progress=False)
    ref_model = copy.deepcopy(model)
    h = H.diagonal(model, ce, [(X, Y)], eval_mode=False, params=names, progress=False)
    bn = ref_model[1]
    out = ref_model(X)  # training mode: batch statistics
    ref = {n: torch.zeros_like(p) for n, p in zip(names, (bn.weight, bn.bias))}
    for s in range(X.shape[0]):
        gs = torch.autograd.grad(ce(out[s : s + 1], Y[s : s + 1]), [bn.weight, bn.bias],
                                 retain_graph=True)
        for n, g in zip(names, gs):
            ref[n] += g**2
    assert_maps(h, ref, rtol=1e-10, dtype=F64)
    # in eval mode (the default) the same model runs on its running statistics
    h_eval = H.diagonal(model, ce, [(X, Y)], progress=False)
    assert_maps(h_eval, fisher_oracle(model, ce, X, Y), rtol=1e-10)


# ---- BackPACK (the peer users compare with) ---------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_agrees_with_backpack(kind):
    bp = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact, SumGradSquared

    if kind == "conv3d_pad_mode":
        pytest.skip("BackPACK's Conv3d derivatives handle zero padding only")
    # BackPACK's ConvTranspose takes neither groups nor output_padding (shape errors)
    model, shape = make_model(kind, full=False)
    model.eval()
    X, Y = _data(shape)
    ce = nn.CrossEntropyLoss(reduction="sum")
    bmodel = bp.extend(copy.deepcopy(model))
    bloss = bp.extend(nn.CrossEntropyLoss(reduction="sum"))
    with bp.backpack(SumGradSquared(), DiagGGNExact()):
        bloss(bmodel(X), Y).backward()
    sgs = {n: p.sum_grad_squared for n, p in bmodel.named_parameters()}
    ggn = {n: p.diag_ggn_exact for n, p in bmodel.named_parameters()}
    assert_maps(H.diagonal(model, ce, [(X, Y)], method="fisher", progress=False), sgs, rtol=1e-9,
                dtype=F64)
    assert_maps(H.diagonal(model, ce, [(X, Y)], method="ggn", progress=False), ggn, rtol=1e-9,
                dtype=F64)


# ---- precision: a float64 model gets a float64 diagonal ----------------------------------------
def test_float64_model_float64_diagonal_beyond_float32_precision():
    # logits that saturate the softmax (p ~ 1 - 1e-9): a float32 factor would lose them
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(6)
    X, Y = torch.randn(7, 4, dtype=F64) * 3, torch.randint(0, 3, (7,))
    ce = nn.CrossEntropyLoss(reduction="sum")
    for method, oracle in (("fisher", fisher_oracle), ("ggn", ggn_oracle)):
        h = H.diagonal(model, ce, [(X, Y)], method=method, progress=False)
        assert_maps(h, oracle(model, ce, X, Y), rtol=1e-11, dtype=F64)
    # sequences (T > 1: the compiled float64 kernel, not the T = 1 GEMM)
    seq = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Flatten(), nn.Linear(20, 3)).double()
    Xs = torch.randn(5, 4, 6, dtype=F64)
    Ys = torch.randint(0, 3, (5,))
    assert_maps(H.diagonal(seq, ce, [(Xs, Ys)], method="ggn", progress=False),
                ggn_oracle(seq, ce, Xs, Ys), rtol=1e-11, dtype=F64)


def test_float64_entries_near_1e300_stay_finite_and_float32_overflow_is_an_error():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X, Y = torch.randn(4, 3, dtype=F64) * 1e75, torch.randn(4, 2, dtype=F64) * 1e75
    mse = nn.MSELoss(reduction="sum")
    h = H.diagonal(model, mse, [(X, Y)], progress=False)
    ref = fisher_oracle(model, mse, X, Y)
    assert float(h["0.weight"].max()) > 1e299 and all(bool(torch.isfinite(v).all()) for v in h.values())
    assert_maps(h, ref, rtol=1e-12, dtype=F64)
    # hutchinson sums its probes in float64 too: a Linear with one input and no bias has a
    # diagonal Hessian (2 sum_s x_s^2 per weight), which one probe gives exactly
    lin = nn.Sequential(nn.Linear(1, 2, bias=False)).double()
    X1 = torch.randn(4, 1, dtype=F64) * 1e150
    hh = H.diagonal(lin, mse, [(X1, torch.zeros(4, 2, dtype=F64))], method="hutchinson", seed=0,
                    progress=False)
    assert hh["0.weight"].dtype == F64
    torch.testing.assert_close(hh["0.weight"], (2 * X1.square().sum()).expand(2, 1), rtol=1e-12,
                               atol=0)
    # the same data in a float32 model overflows float32: an error naming the parameters
    m32 = nn.Sequential(nn.Linear(3, 2))
    X32, Y32 = torch.randn(4, 3) * 1e15, torch.randn(4, 2) * 1e15
    with pytest.raises(ValueError, match=r"0.weight.*float32 range.*model.double\(\)"):
        H.diagonal(m32, mse, [(X32, Y32)], progress=False)


def test_sumsq_op_float64_path():
    torch.manual_seed(4)
    for B, R, T, o, i in [(5, 1, 1, 70, 130), (3, 2, 7, 65, 3), (2, 3, 70, 33, 300)]:
        g = torch.randn(B, T, R, o, dtype=F64).transpose(1, 2)  # strided
        x = torch.randn(B, T, i, dtype=F64) * 1e100
        acc = torch.rand(o, i, dtype=F64)
        want = acc.clone()
        for b in range(B):
            for r in range(R):
                want += (g[b, r].T @ x[b]) ** 2
        torch.ops.popcomp.sumsq_outer_acc(acc, g, x)
        torch.testing.assert_close(acc, want, rtol=1e-13, atol=0)
        # the reference from zeros: acc's initial entries (<= 1) vanish against ~1e200
        ref = torch.zeros(o, i, dtype=F64)
        sumsq_outer_acc_reference(ref, g, x)
        torch.testing.assert_close(ref, want, rtol=1e-13, atol=0)
    acc64, acc32 = torch.zeros(5, 7, dtype=F64), torch.zeros(5, 7)
    g64, x64 = torch.randn(3, 2, 4, 5, dtype=F64), torch.randn(3, 4, 7, dtype=F64)
    with pytest.raises(TypeError, match="g must be float64 with a float64 acc"):
        torch.ops.popcomp.sumsq_outer_acc(acc64, g64.float(), x64)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16 with a float32 acc"):
        torch.ops.popcomp.sumsq_outer_acc(acc32, g64.float(), x64)
    torch.library.opcheck(torch.ops.popcomp.sumsq_outer_acc.default, (acc64, g64, x64))


# ---- ggn accepts the functional losses fisher accepts ------------------------------------------
@pytest.mark.parametrize("method", ["ggn", "ggn_mc"])
def test_ggn_accepts_functional_losses(method):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    X = torch.randn(6, 4, dtype=F64)
    Yc, Yr, Yb = torch.randint(0, 3, (6,)), torch.randn(6, 3, dtype=F64), torch.rand(6, 3).round().double()
    kw = dict(method=method, seed=0, mc_samples=3, progress=False)
    cases = [(F.cross_entropy, nn.CrossEntropyLoss(), Yc),
             (F.mse_loss, nn.MSELoss(), Yr),
             (F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss(), Yb),
             (functools.partial(F.cross_entropy, reduction="sum"), nn.CrossEntropyLoss(reduction="sum"), Yc),
             (functools.partial(F.mse_loss, reduction="sum"), nn.MSELoss(reduction="sum"), Yr)]
    for fn, mod, Y in cases:
        got = H.diagonal(model, fn, [(X, Y)], **kw)
        want = H.diagonal(model, mod, [(X, Y)], **kw)
        assert_maps(got, want, rtol=1e-12, dtype=F64)
    # the exact GGN of the functional against the oracle
    if method == "ggn":
        assert_maps(H.diagonal(model, F.cross_entropy, [(X, Yc)], **kw),
                    ggn_oracle(model, F.cross_entropy, X, Yc),
                    rtol=1e-10)
    with pytest.raises(ValueError, match=r"loss_fn: .*F.cross_entropy.*lambda"):
        H.diagonal(model, lambda o, y: F.cross_entropy(o, y), [(X, Yc)], **kw)
    with pytest.raises(ValueError, match="loss_fn: reduction='none'"):
        H.diagonal(model, functools.partial(F.cross_entropy, reduction="none"), [(X, Yc)], **kw)


# ---- frozen parameters: one rule -----------------------------------------------------------
def test_frozen_parameters_are_skipped_unless_named():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Conv1d(1, 2, 3),
                          nn.Flatten(), nn.Linear(8, 3)).double()

    class View(nn.Module):
        def forward(self, x):
            return x.unsqueeze(1)

    model.insert(3, View())
    model[0].requires_grad_(False)  # a supported module, frozen
    model[1].requires_grad_(False)  # an unsupported one, frozen
    model[6].bias.requires_grad_(False)  # half of a module
    X, Y = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    ce = nn.CrossEntropyLoss(reduction="sum")
    for method in ("fisher", "ggn", "hutchinson"):
        acc = H.HessianAccumulator(model, ce, method)
        assert acc._estimator.names == ["4.weight", "4.bias", "6.weight"], method
        if method != "hutchinson":  # no work on the frozen module: it is not accumulated at all
            assert [s.name for s in acc._estimator.sites] == ["4", "6"]
    h = H.diagonal(model, ce, [(X, Y)], progress=False)
    assert_maps(h, fisher_oracle(model, ce, X, Y), rtol=1e-10)  # the oracle: trainable ones
    # named in params=: accumulated although frozen (and left frozen)
    h2 = H.diagonal(model, ce, [(X, Y)], params=["0.weight", "6.bias"], progress=False)
    assert list(h2) == ["0.weight", "6.bias"]
    full = copy.deepcopy(model).requires_grad_(True)
    full[1].requires_grad_(False)
    ref = fisher_oracle(full, ce, X, Y)
    assert_maps(h2, {k: ref[k] for k in h2}, rtol=1e-10)
    assert not model[0].weight.requires_grad and not model[6].bias.requires_grad
    # a frozen model: nothing asked for, and the message says how to ask
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match=r"params: nothing to accumulate.*named in params="):
        H.diagonal(frozen, ce, [(X, Y)], progress=False)
    # an unsupported module whose parameter is named is refused, frozen or not
    with pytest.raises(ValueError, match=r"1 \(LayerNorm\)"):
        H.diagonal(model, ce, [(X, Y)], params=["1.weight"], progress=False)


# ---- Hessian-related unclear errors ----------------------------------------------------------
@pytest.mark.parametrize("method", ["fisher", "ggn", "ggn_mc", "hutchinson"])
def test_reduction_none_and_nan_data_are_clear_errors(method):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    X, Y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="loss_fn: reduction='none'"):
        H.diagonal(model, nn.CrossEntropyLoss(reduction="none"), [(X, Y)], method=method,
                   progress=False)
    with pytest.raises(ValueError, match="loss_fn: reduction='none'"):  # a functional too
        H.diagonal(model, functools.partial(F.cross_entropy, reduction="none"), [(X, Y)],
                   method=method, reduction="sum", progress=False)
    # a callable returning per-sample losses (ggn/ggn_mc cannot read a lambda at all)
    msg = "loss_fn must return a scalar" if method in ("fisher", "hutchinson") else "lambda"
    with pytest.raises(ValueError, match=msg):
        H.diagonal(model, lambda o, y: F.cross_entropy(o, y, reduction="none"), [(X, Y)],
                   method=method, progress=False)
    with pytest.raises(ValueError, match=msg):
        H.diagonal(model, lambda o, y: F.cross_entropy(o, y, reduction="none"), [(X, Y)],
                   method=method, reduction="sum", progress=False)
    Xn = X.clone()
    Xn[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"data: the batch's inputs contain NaN or Inf"):
        H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y), (Xn, Y)], method=method, progress=False)
    Yr = torch.randn(6, 3)
    Yr[0, 0] = float("inf")
    if method in ("fisher", "hutchinson"):  # the loss gradient needs the targets
        with pytest.raises(ValueError, match=r"data: the batch's targets contain NaN or Inf"):
            H.diagonal(model, nn.MSELoss(), [(X, Yr)], method=method, progress=False)
    else:  # the GGN of MSE does not depend on the targets: a finite, correct diagonal
        h = H.diagonal(model, nn.MSELoss(), [(X, Yr)], method=method, seed=0, progress=False)
        ref = H.diagonal(model, nn.MSELoss(), [(X, torch.zeros(6, 3))], method=method, seed=0,
                         progress=False)
        for k in ref:
            assert bool(torch.isfinite(h[k]).all())
            torch.testing.assert_close(h[k], ref[k])
    # dict inputs are checked too
    with pytest.raises(ValueError, match=r"inputs contain NaN"):
        acc = H.HessianAccumulator(model, nn.CrossEntropyLoss(), method)
        acc.update({"input": Xn}, Y)
    assert Xn.isnan().sum() == 1  # inputs never modified


@pytest.mark.parametrize("method", ["fisher", "ggn", "hutchinson"])
def test_nan_from_the_model_is_an_error_naming_the_model(method):
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    X, Y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"model: the (model output|loss) is NaN or Inf on a batch "
                                         r"whose data is finite"):
        H.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], method=method, progress=False)


def test_sumsq_op_float64_on_cuda_agrees_with_the_cpu(cuda_device):
    # float64 operands run the float64 CUDA kernel (sums in double): the CPU's result to 1e-12
    torch.manual_seed(8)
    g = torch.randn(4, 2, 9, 33, dtype=F64)
    x = torch.randn(4, 9, 70, dtype=F64)
    acc = torch.rand(33, 70, dtype=F64)
    want = acc.clone()
    torch.ops.popcomp.sumsq_outer_acc(want, g, x)
    got = acc.to(cuda_device)
    torch.ops.popcomp.sumsq_outer_acc(got, g.to(cuda_device), x.to(cuda_device))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=0)
    model, shape = make_model("convT2d")
    X, Y = _data(shape)
    ce = nn.CrossEntropyLoss(reduction="sum")
    h = H.diagonal(copy.deepcopy(model).to(cuda_device), ce, [(X, Y)], method="ggn", progress=False)
    assert_maps({k: v.cpu() for k, v in h.items()}, ggn_oracle(model, ce, X, Y), rtol=1e-10, dtype=F64)


@pytest.mark.parametrize("kind", ["conv3d", "convT1d", "convT2d", "convT3d"])
@pytest.mark.parametrize("method", ["fisher", "ggn", "ggn_mc"])
def test_chain_takes_conv3d_and_transposed_convs_like_the_generic_path(kind, method):
    # Sequentials of these layers run on the hand-written chain (input gradients by conv3d_input
    # / the convolution of the columns); a container hook forces the autograd path
    model, shape = make_model(kind)
    X, Y = _data(shape)
    ce = nn.CrossEntropyLoss()
    acc = H.HessianAccumulator(model, ce, method, seed=0, mc_samples=2)
    model.eval()
    assert acc._estimator.chain is not None and acc._estimator.chain.ready(X)
    fast = acc.accumulate([(X, Y)], progress=False).result()
    hook = model.register_forward_hook(lambda *a: None)
    try:
        acc2 = H.HessianAccumulator(model, ce, method, seed=0, mc_samples=2)
        assert not acc2._estimator.chain.ready(X)
        ref = acc2.accumulate([(X, Y)], progress=False).result()
    finally:
        hook.remove()
    assert_maps(fast, ref, rtol=1e-11, dtype=F64)
