"""popcomp.spectral (popcomp.prune): spectral quantities, reconstruction and spectral_prune on MLPs,
CNNs and ResNet blocks, checked against the closed-form formulas of Suzuki et al. (2020)."""
import math

import pytest
import torch
from torch import nn

import popcomp
from popcomp import spectral as P

F64 = torch.float64


def _cov(m, n=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n or 4 * m, m, generator=g, dtype=F64) * torch.logspace(0, -2, m, dtype=F64)
    A = A @ torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))[0]
    return A.T @ A / A.shape[0]


# ---- spectral quantities -------------------------------------------------------------------


def test_degrees_of_freedom_matches_eigenvalues_and_trace():
    S = _cov(30, seed=1)
    mu = torch.linalg.eigvalsh(S)
    for lam in [1e-6, 1e-3, 0.1, 10.0]:
        want = float((mu / (mu + lam)).sum())
        direct = float(torch.trace(S @ torch.linalg.inv(S + lam * torch.eye(30, dtype=F64))))
        got = P.degrees_of_freedom(S, lam)
        assert got == pytest.approx(want, rel=1e-10)
        assert got == pytest.approx(direct, rel=1e-8)
    lams = torch.logspace(-6, 2, 20, dtype=F64)
    n = P.degrees_of_freedom(S, lams)
    assert bool((n[1:] < n[:-1]).all())  # decreasing in lambda
    assert P.degrees_of_freedom(S, 0.0) == pytest.approx(30.0)


def test_output_dof_and_leverage():
    S = _cov(20, seed=2)
    Z = torch.randn(7, 20, dtype=F64)
    lam = 0.01
    K = S @ torch.linalg.inv(S + lam * torch.eye(20, dtype=F64))
    assert P.output_degrees_of_freedom(S, lam, Z) == pytest.approx(float(torch.trace(Z @ K @ Z.T)), rel=1e-8)
    lev = P.leverage_scores(S, lam)
    assert float(lev.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(lev, K.diagonal() / K.trace(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(P.default_tau(S, 5, lam=lam), 5 * lam * lev)
    lam0 = P.default_lambda(S)
    assert lam0 == pytest.approx(1e-6 * float(S.trace()))
    torch.testing.assert_close(P.default_tau(S, 5), 5 * lam0 * P.leverage_scores(S, lam0))


def test_lambda_width_relation_eq3():
    S = _cov(200, seed=3)
    for width in [10, 40, 120]:
        lam = P.lambda_from_width(S, width)
        n = P.degrees_of_freedom(S, lam)
        assert width >= 5 * n * math.log(80 * n) - 1e-6
        n2 = P.degrees_of_freedom(S, lam * (1 - 1e-6))  # the infimum: a smaller lambda fails
        assert width < 5 * n2 * math.log(80 * n2)
        assert P.width_from_lambda(S, lam) <= width
    assert P.lambda_from_width(S, 10) > P.lambda_from_width(S, 120)
    assert P.lambda_from_width(torch.eye(2, dtype=F64), 100) == 0.0


def test_degrees_of_freedom_at_lambda_zero_is_the_rank():
    # eq. (3) takes the infimum over lambda >= 0, so N(0) is evaluated: the limit lambda -> 0+,
    # the number of positive eigenvalues; negative lambda is refused (by every name of N)
    S = torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=F64))
    for x in (S, torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=F64)):
        for dof in (P.degrees_of_freedom, popcomp.theory.degrees_of_freedom):
            assert float(dof(x, 0.0)) == 2.0
            assert float(dof(x, 1e-12)) == pytest.approx(2.0, rel=1e-11)  # continuous at 0
            with pytest.raises(ValueError, match="lam"):
                dof(x, -1e-3)
    lev = P.leverage_scores(S, 0.0)
    torch.testing.assert_close(lev, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64))
    torch.testing.assert_close(lev, P.leverage_scores(S, 1e-14), rtol=0, atol=1e-13)
    # eq. (3) at lambda = 0: 5 N(0) log(80 N(0)) = 10 log 160 = 50.75, so a width of 51 needs no
    # ridge (the infimum is 0) and 50 does; from lambda = 0 the width 51 is clipped to m = 4
    for lam_of, width_of in ((P.lambda_from_width, P.width_from_lambda),
                             (popcomp.theory.lambda_for_width, popcomp.theory.width_for_lambda)):
        assert lam_of(S, 51) == 0.0 and lam_of(S, 50) > 0.0
        assert width_of(S, 0.0) == 4


def test_eq3_has_one_rule_under_both_names():
    # popcomp.theory's width_for_lambda / lambda_for_width are the paper's constants 5 and 80 of
    # spectral's rule; covariance or its eigenvalues, the answer is the same infimum
    S = _cov(60, seed=8)
    mu = torch.linalg.eigvalsh(S)
    for width in (3, 17, 45):
        lam = P.lambda_from_width(S, width)
        for got in (popcomp.theory.lambda_for_width(S, width), popcomp.theory.lambda_for_width(mu, width),
                    P.lambda_from_width(mu, width, c1=5.0, c2=80.0)):
            assert got == pytest.approx(lam, rel=1e-8)
        n = P.degrees_of_freedom(S, lam)
        assert width >= 5 * n * math.log(80 * n) - 1e-6
        assert popcomp.theory.width_for_lambda(mu, lam) == P.width_from_lambda(S, lam) <= width
    # other constants are the caller's: a smaller c1 asks less, so a smaller lambda suffices
    assert P.lambda_from_width(S, 17, c1=1.0) < P.lambda_from_width(S, 17)


def test_compatibility_namespaces_name_the_same_objects():
    # popcomp.prune keeps every public name it had; each is spectral's
    old_prune = ["spectral_prune", "PruneReport", "LayerReport", "find_sites", "reconstruction",
                 "reconstruction_error", "pruned_next_weight", "degrees_of_freedom",
                 "output_degrees_of_freedom", "leverage_scores", "lambda_from_width", "width_from_lambda",
                 "default_lambda", "default_tau", "output_matrix", "DEFAULT_LAMBDA_REL", "DEFAULT_THETA"]
    for name in old_prune:
        assert getattr(popcomp.prune, name) is getattr(P, name), name
    for name in ["covariance_accumulate", "CovarianceAccumulator", "greedy_select", "GreedyResult"]:
        assert getattr(popcomp, name) is getattr(P, name), name
    assert popcomp.spectral_prune is P.spectral_prune and popcomp.greedy_select is P.greedy_select
    assert (P.DEFAULT_LAMBDA_REL, P.DEFAULT_THETA, P.EQ3_C1, P.EQ3_C2) == (1e-6, 0.5, 5.0, 80.0)


def test_reconstruction_closed_form_and_error():
    g = torch.Generator().manual_seed(4)
    phi = torch.randn(500, 12, generator=g, dtype=F64) @ torch.randn(12, 12, generator=g, dtype=F64)
    S = phi.T @ phi / 500
    J = torch.tensor([3, 7, 0, 9])
    tau = torch.rand(12, generator=g, dtype=F64)
    A = P.reconstruction(S, J, tau)
    # eq. (1): argmin_A E||phi - A phi_J||^2 + Tr[A I_tau A^T]: normal equations
    want = torch.linalg.solve(phi[:, J].T @ phi[:, J] / 500 + torch.diag(tau[J]), phi[:, J].T @ phi / 500).T
    torch.testing.assert_close(A, want)
    loss = float(((phi - phi[:, J] @ A.T) ** 2).sum(1).mean() + torch.trace(A @ torch.diag(tau[J]) @ A.T))
    assert P.reconstruction_error(S, J, tau) == pytest.approx(loss, rel=1e-9)
    # greedy objective equals the closed form at its own selection
    Zs = torch.randn(5, 12, generator=torch.Generator().manual_seed(4), dtype=F64)
    res = popcomp.greedy_select(S, 4, tau=tau, theta=0.3, Z=Zs)
    assert float(res.objective[-1]) == pytest.approx(P.reconstruction_error(S, res.indices, tau, Zs, 0.3), rel=1e-9)
    # all units, tau = 0: exact decoder (a permutation)
    perm = torch.randperm(12, generator=g)
    torch.testing.assert_close(P.reconstruction(S, perm, 0.0), torch.eye(12, dtype=F64)[:, perm], atol=1e-9, rtol=0)


def test_pruned_next_weight_shapes():
    A = torch.randn(6, 3, dtype=F64)
    W = torch.randn(4, 6, dtype=F64)
    torch.testing.assert_close(P.pruned_next_weight(W, A), W @ A)
    Wc = torch.randn(4, 6, 3, 3, dtype=F64)
    torch.testing.assert_close(P.pruned_next_weight(Wc, A), torch.einsum("ocab,cj->ojab", Wc, A))
    with pytest.raises(ValueError):
        P.pruned_next_weight(torch.randn(4, 5), A)


def test_output_matrix_formula():
    W = torch.randn(5, 8, dtype=F64)
    lev = torch.rand(5, dtype=F64)
    keep = torch.tensor([4, 1])
    Z = P.output_matrix(W, 8, keep, lev)
    q = (1 / lev[keep]) / (1 / lev[keep]).sum()
    want = torch.sqrt(8 * q)[:, None] * W[keep] / W.norm(dim=1).max()
    torch.testing.assert_close(Z, want)
    Zc = P.output_matrix(torch.randn(3, 8, 2, 2, dtype=F64), 8)
    assert Zc.shape == (12, 8)


# ---- models -----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cmid, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cmid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cmid)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cmid, cin, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cin)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Bottleneck(nn.Module):
    def __init__(self, cin, width):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cin, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + x)


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g, dtype=F64) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=F64) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g, dtype=F64) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g, dtype=F64) - 0.2)
    return model


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3)).double()


def cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 5),
    ).double()
    return _randomize_bn(m, seed)


def resnet(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        BasicBlock(8, 12), Bottleneck(8, 10),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()
    return _randomize_bn(m, seed)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _plain_torch(model):
    return all(type(m).__module__.startswith("torch.nn") or isinstance(m, (BasicBlock, Bottleneck))
               for m in model.modules())


@pytest.mark.parametrize("make,x", [(mlp, lambda: torch.randn(400, 10, dtype=F64)),
                                    (cnn, lambda: torch.randn(60, 3, 8, 8, dtype=F64)),
                                    (resnet, lambda: torch.randn(40, 3, 6, 6, dtype=F64))])
def test_all_kept_tau_zero_reproduces_outputs(make, x):
    model = make()
    X = x()
    before = _state(model)
    pm, rep = popcomp.spectral_prune(model, [X[: len(X) // 2], X[len(X) // 2:]], widths=1.0, tau=0.0,
                                     theta=0.5, progress=False)
    assert _same_state(before, _state(model))
    assert pm.training == model.training  # the mode of the input model is kept
    model.eval()
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(X), model(X), rtol=1e-8, atol=1e-8)
    assert rep.relative_error < 1e-8
    assert rep.params_after == rep.params_before


def _phi_cov(model, capture, X):
    store = []
    h = capture.register_forward_pre_hook(lambda mod, a: store.append(a[0].detach()))
    with torch.no_grad():
        model.eval()
        model(X)
    h.remove()
    a = store[0]
    a = a.movedim(1, -1).reshape(-1, a.shape[1]) if a.dim() > 2 else a
    return a.T @ a / a.shape[0]


@pytest.mark.parametrize("procedure", ["backward", "simultaneous"])
def test_pruned_mlp_matches_formula(procedure):
    model = mlp(1)
    X = torch.randn(300, 10, dtype=F64)
    pm, rep = popcomp.spectral_prune(model, X, widths={"0": 11, "2": 9}, procedure=procedure, progress=False)
    J0, J2 = rep.layers[0].indices, rep.layers[1].indices
    assert [l.name for l in rep.layers] == ["0", "2"]
    S0 = _phi_cov(model, model[2], X)
    S2 = _phi_cov(model, model[4], X)
    A0 = P.reconstruction(S0, J0, P.default_tau(S0, 11))
    A2 = P.reconstruction(S2, J2, P.default_tau(S2, 9))
    W0, b0, W2, b2, W4, b4 = (t.detach() for t in model.parameters())
    # f#(x) = W4 A2 relu(W2[J2] A0 relu(W0[J0] x + b0[J0]) + b2[J2]) + b4
    h = torch.relu(X @ W0[J0].T + b0[J0])
    h = torch.relu(h @ (W2[J2] @ A0).T + b2[J2])
    want = h @ (W4 @ A2).T + b4
    with torch.no_grad():
        torch.testing.assert_close(pm(X), want)
    assert pm[0].out_features == 11 and pm[2].in_features == 11 and pm[2].out_features == 9
    assert pm[4].in_features == 9
    assert rep.params_after < rep.params_before and rep.flops_after < rep.flops_before
    assert rep.widths_before == {"0": 32, "2": 24} and rep.widths_after == {"0": 11, "2": 9}
    model.eval()
    with torch.no_grad():
        y, y2 = model(X), pm(X)
    assert rep.relative_error == pytest.approx(float((y - y2).norm() / y.norm()), rel=1e-9)
    assert _plain_torch(pm)


def test_backward_uses_kept_next_units():
    """Backward: Z of layer 0 is built from the rows of layer 2 kept by its own selection."""
    model = mlp(2)
    X = torch.randn(300, 10, dtype=F64)
    _, rep = popcomp.spectral_prune(model, X, widths={"0": 10, "2": 6}, procedure="backward", progress=False)
    S0 = _phi_cov(model, model[2], X)
    S2 = _phi_cov(model, model[4], X)
    lev2 = P.leverage_scores(S2, P.default_lambda(S2))
    Z = P.output_matrix(model[2].weight.detach(), 32, rep.layers[1].indices, lev2)
    res = popcomp.greedy_select(S0, 10, tau=P.default_tau(S0, 10), theta=0.5, Z=Z)
    assert res.indices.tolist() == rep.layers[0].indices.tolist()


def test_pruned_cnn_matches_formula():
    model = cnn(3)
    X = torch.randn(50, 3, 8, 8, dtype=F64)
    pm, rep = popcomp.spectral_prune(model, X, widths=[7, 10], theta=0.5, progress=False)
    pm.eval()
    J0, J4 = rep.layers[0].indices, rep.layers[1].indices
    S0 = _phi_cov(model, model[4], X)       # input of conv 4 (after pool): channels x positions
    S4 = _phi_cov(model, model[8], X)       # input of Flatten
    A0 = P.reconstruction(S0, J0, P.default_tau(S0, 7))
    A4 = P.reconstruction(S4, J4, P.default_tau(S4, 10))
    c0, bn0, c4, bn4, lin = model[0], model[1], model[4], model[5], model[9]

    def bn(x, b, J):
        return (x - b.running_mean[J, None, None]) / torch.sqrt(b.running_var[J, None, None] + b.eps) \
            * b.weight[J, None, None] + b.bias[J, None, None]

    with torch.no_grad():
        h = nn.functional.conv2d(X, c0.weight[J0], c0.bias[J0], padding=1)
        h = nn.functional.max_pool2d(torch.relu(bn(h, bn0, J0)), 2)
        W4 = torch.einsum("ocab,cj->ojab", c4.weight, A0)[J4]
        h = nn.functional.conv2d(h, W4, c4.bias[J4], padding=1)
        h = nn.functional.avg_pool2d(torch.relu(bn(h, bn4, J4)), 2)
        WL = torch.einsum("ocp,cj->ojp", lin.weight.reshape(5, 16, 4), A4).reshape(5, -1)
        want = h.flatten(1) @ WL.T + lin.bias
        torch.testing.assert_close(pm(X), want)
    assert pm[0].out_channels == 7 and pm[4].in_channels == 7 and pm[9].in_features == 40
    assert rep.params_after < rep.params_before and rep.flops_after < rep.flops_before
    assert _plain_torch(pm)


def test_pruned_resnet_blocks_match_formula():
    model = resnet(4)
    X = torch.randn(30, 3, 6, 6, dtype=F64)
    sites = [s.name for s in P.find_sites(model)]
    assert sites == ["3.conv1", "4.conv1", "4.conv2"]  # the stem feeds residual channels: untouched
    pm, rep = popcomp.spectral_prune(model, X, widths={"3.conv1": 5, "4.conv1": 4, "4.conv2": 6},
                                     progress=False)
    pm.eval()
    blk, bot = model[3], model[4]
    L = {l.name: l.indices for l in rep.layers}
    S1 = _phi_cov(model, blk.conv2, X)
    A1 = P.reconstruction(S1, L["3.conv1"], P.default_tau(S1, 5))
    Sb1 = _phi_cov(model, bot.conv2, X)
    Ab1 = P.reconstruction(Sb1, L["4.conv1"], P.default_tau(Sb1, 4))
    Sb2 = _phi_cov(model, bot.conv3, X)
    Ab2 = P.reconstruction(Sb2, L["4.conv2"], P.default_tau(Sb2, 6))

    def bnf(x, b, J=None):
        J = slice(None) if J is None else J
        return (x - b.running_mean[J, None, None]) / torch.sqrt(b.running_var[J, None, None] + b.eps) \
            * b.weight[J, None, None] + b.bias[J, None, None]

    with torch.no_grad():
        x = torch.relu(bnf(nn.functional.conv2d(X, model[0].weight, padding=1), model[1]))
        J = L["3.conv1"]
        h = torch.relu(bnf(nn.functional.conv2d(x, blk.conv1.weight[J], padding=1), blk.bn1, J))
        h = bnf(nn.functional.conv2d(h, torch.einsum("ocab,cj->ojab", blk.conv2.weight, A1), padding=1), blk.bn2)
        x = torch.relu(h + x)
        J1, J2 = L["4.conv1"], L["4.conv2"]
        h = torch.relu(bnf(nn.functional.conv2d(x, bot.conv1.weight[J1]), bot.bn1, J1))
        W2 = torch.einsum("ocab,cj->ojab", bot.conv2.weight, Ab1)[J2]
        h = torch.relu(bnf(nn.functional.conv2d(h, W2, padding=1), bot.bn2, J2))
        h = bnf(nn.functional.conv2d(h, torch.einsum("ocab,cj->ojab", bot.conv3.weight, Ab2)), bot.bn3)
        x = torch.relu(h + x)
        want = model[7](x.mean((2, 3)))
        torch.testing.assert_close(pm(X), want)
    assert pm[3].conv1.out_channels == 5 and pm[3].conv2.in_channels == 5 and pm[3].conv2.out_channels == 8
    assert pm[4].conv2.weight.shape == (6, 4, 3, 3) and pm[4].conv3.out_channels == 8
    assert rep.params_after < rep.params_before and rep.flops_after < rep.flops_before


def test_single_block_model_and_lambda_widths():
    blk = _randomize_bn(Bottleneck(6, 12).double())
    X = torch.randn(20, 6, 5, 5, dtype=F64)
    pm, rep = popcomp.spectral_prune(blk, X, widths=0.5, procedure="simultaneous", progress=False)
    assert pm.conv1.out_channels == 6 and pm.conv2.out_channels == 6
    pm2, rep2 = popcomp.spectral_prune(blk, X, widths="lambda", lam=10.0, progress=False)
    for l in rep2.layers:
        assert 1 <= l.width_after <= l.width_before
        assert l.lam == 10.0


def test_errors_and_model_untouched():
    model = mlp()
    before = _state(model)
    X = torch.randn(50, 10, dtype=F64)
    with pytest.raises(ValueError, match="Upsample"):
        popcomp.spectral_prune(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2), nn.Conv2d(4, 2, 3)),
                               torch.randn(2, 3, 8, 8), widths=0.5, progress=False)

    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="'1' \\(Custom\\)"):
        popcomp.spectral_prune(nn.Sequential(nn.Linear(3, 4), Custom(), nn.Linear(4, 2)), torch.randn(5, 3),
                               widths=0.5, progress=False)
    with pytest.raises(ValueError, match="data"):
        popcomp.spectral_prune(model, None, widths=0.5, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        popcomp.spectral_prune(model, [], widths=0.5, progress=False)
    with pytest.raises(ValueError, match="widths"):
        popcomp.spectral_prune(model, X, progress=False)
    with pytest.raises(ValueError, match="widths"):
        popcomp.spectral_prune(model, X, widths={"4": 2}, progress=False)
    with pytest.raises(ValueError, match="widths"):
        popcomp.spectral_prune(model, X, widths={"0": 40}, progress=False)
    with pytest.raises(ValueError, match="theta"):
        popcomp.spectral_prune(model, X, widths=0.5, theta=2.0, progress=False)
    with pytest.raises(ValueError, match="tau"):
        popcomp.spectral_prune(model, X, widths=0.5, tau=-1.0, progress=False)

    def bad_forward(mod, batch):  # fails part way, after the covariance hooks ran once
        if bad_forward.calls > 0:
            raise RuntimeError("boom")
        bad_forward.calls += 1
        return mod(batch)

    bad_forward.calls = 0
    with pytest.raises(RuntimeError, match="boom"):
        popcomp.spectral_prune(model, [X, X], widths=0.5, forward=bad_forward, progress=False)
    assert _same_state(before, _state(model))
    assert model[0].out_features == 32 and not any(m._forward_pre_hooks for m in model.modules())


def test_generator_data_and_progress_bar():
    model = mlp()
    X = torch.randn(64, 10, dtype=F64)
    pm, rep = popcomp.spectral_prune(model, (x for x in X.split(16)), widths=0.75, progress=True)
    assert rep.relative_error < 1.0 and "spectral pruning" in str(rep)
    pm2, _ = popcomp.spectral_prune(model, [(x, torch.zeros(len(x))) for x in X.split(16)], widths=0.75,
                                    progress=False)
    with torch.no_grad():
        torch.testing.assert_close(pm(X), pm2(X))


def test_pruned_model_runs_without_popcomp(tmp_path):
    import subprocess
    import sys

    model = cnn(5)
    X = torch.randn(20, 3, 8, 8, dtype=F64)
    pm, _ = popcomp.spectral_prune(model, X, widths=0.5, progress=False)
    pm.eval()
    torch.save({"model": pm, "x": X}, tmp_path / "m.pt")
    with torch.no_grad():
        torch.save(pm(X), tmp_path / "y.pt")
    code = (
        "import sys, torch\n"
        f"d = torch.load(r'{tmp_path / 'm.pt'}', weights_only=False)\n"
        "with torch.no_grad(): y = d['model'](d['x'])\n"
        f"assert torch.equal(y, torch.load(r'{tmp_path / 'y.pt'}'))\n"
        "assert not any(k.startswith('popcomp') for k in sys.modules), 'popcomp was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_train_mode_and_mixed_modes_are_kept():
    # calibration runs in eval mode (BatchNorm running statistics, no dropout), the input model
    # keeps its state and the mode of every submodule, and the pruned copy gets the same modes
    model = cnn()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in train mode
    modes = [m.training for m in model.modules()]
    before = _state(model)
    X = torch.randn(24, 3, 8, 8, dtype=F64)
    pm, rep = popcomp.spectral_prune(model, X, widths={"0": 12, "4": 16}, tau=0.0, progress=False)
    assert [m.training for m in model.modules()] == modes
    assert _same_state(before, _state(model))
    assert [m.training for m in pm.modules()] == modes
    # every unit kept with tau = 0: the eval-mode outputs agree, so the BatchNorm running
    # statistics (not the batch statistics) were used for the covariances
    model.eval()
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(pm(X), model(X), atol=1e-9)
    assert rep.relative_error < 1e-9


def test_per_channel_prelu_is_pruned_with_its_channels():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 10), nn.PReLU(10), nn.Linear(10, 3)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-0.5, 0.5, 10, dtype=F64))
    X = torch.randn(200, 6, dtype=F64)
    assert [s.norms for s in P.find_sites(model)] == [["1"]]
    pm, rep = popcomp.spectral_prune(model, X, widths=[6], tau=0.0, progress=False)
    J = rep.layers[0].indices
    assert pm[1].num_parameters == 6 and torch.equal(pm[1].weight.detach(), model[1].weight.detach()[J])
    # the kept activations are those of the original network
    with torch.no_grad():
        assert torch.allclose(pm[1](pm[0](X)), model[1](model[0](X))[:, J])
        assert pm(X).shape == (200, 3)


def test_layers_not_over_the_pruned_channels_are_not_sites():
    # a BatchNorm1d over the flattened features (channels x positions), and a Linear applied to
    # the last (spatial) axis of a Conv2d output: neither reads the conv channels as units
    bn_flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4),
                            nn.Linear(64, 2))
    conv_lin = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(16, 3, 6, 6)
    for model in (bn_flat, conv_lin):
        assert P.find_sites(model) == []
        with pytest.raises(ValueError, match="no layer to prune"):
            popcomp.spectral_prune(model, x, widths=0.5, progress=False)
    # a BatchNorm1d(m) after a (no-op) Flatten of Linear outputs still is one
    ok = nn.Sequential(nn.Linear(5, 8), nn.Flatten(), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    assert [s.norms for s in P.find_sites(ok)] == [["2"]]
    pm, _ = popcomp.spectral_prune(ok, torch.randn(30, 5), widths=[4], progress=False)
    assert pm(torch.randn(3, 5)).shape == (3, 2)


def test_empty_batch_in_the_data():
    model = cnn()
    X = torch.randn(24, 3, 8, 8, dtype=F64)
    pm, rep = popcomp.spectral_prune(model, [X, X[:0]], widths=0.5, progress=False)
    pm2, rep2 = popcomp.spectral_prune(model, X, widths=0.5, progress=False)
    assert rep.relative_error == pytest.approx(rep2.relative_error, rel=1e-9)


def test_per_layer_specs_are_checked():
    model = mlp()
    X = torch.randn(50, 10, dtype=F64)
    for w in ([1.5], [-0.5], {"0": float("nan")}, {"0": 0.0}):
        with pytest.raises(ValueError, match=r"widths\['0'\]"):
            popcomp.spectral_prune(model, X, widths=w, progress=False)
    with pytest.raises(ValueError, match=r"widths\['2'\]"):
        popcomp.spectral_prune(model, X, widths={"2": "lamda"}, progress=False)
    for what in ("lam", "tau"):
        with pytest.raises(ValueError, match=what):
            popcomp.spectral_prune(model, X, widths=0.5, progress=False, **{what: {"O": 0.1}})


def test_pruned_layers_keep_requires_grad_dtype_and_device():
    # frozen parameters stay frozen (and trainable ones trainable) in every rewritten layer:
    # producers, BatchNorm, per-channel PReLU, consumers, residual-block convolutions
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.PReLU(6),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        BasicBlock(8, 12), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 2),
    ).double()
    _randomize_bn(model, 5)
    names = [n for n, _ in model.named_parameters()]
    for i, (n, p) in enumerate(model.named_parameters()):
        if i % 2 == 0 or n.startswith("6.conv"):  # weights frozen, biases not, block convs frozen
            p.requires_grad_(False)
    want = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(want.values()) and not all(want.values())
    X = torch.randn(20, 3, 6, 6, dtype=F64)
    pm, rep = popcomp.spectral_prune(model, X, widths=0.5, progress=False)
    assert {l.name for l in rep.layers} == {"0", "6.conv1", "9"}
    got = dict(pm.named_parameters())
    assert list(got) == names
    for n, p in got.items():
        assert p.requires_grad == want[n], n
        assert p.dtype == F64 and p.device == X.device, n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == want  # input untouched


def test_non_finite_calibration_data_or_activations_name_the_data_or_layer():
    model = mlp(7)
    X = torch.randn(50, 10, dtype=F64)
    # NaN in the calibration data (second batch of three): the error names the data
    bad = X.clone()
    bad[30, 4] = float("nan")
    batches = [bad[:20], bad[20:40], bad[40:]]
    with pytest.raises(ValueError, match=r"data.*batch 1.*NaN or Inf"):
        popcomp.spectral_prune(model, batches, widths=0.5, progress=False)
    assert not torch.isfinite(bad).all()  # the input is not modified
    # finite data, but the model produces Inf after its second Linear: the error names that layer
    broken = mlp(7)
    with torch.no_grad():
        broken[2].bias[3] = float("inf")
    with pytest.raises(ValueError, match=r"layer '4'.*NaN or Inf.*model") as e:
        popcomp.spectral_prune(broken, X, widths=0.5, progress=False)
    assert "'2'" in str(e.value) and "cov" not in str(e.value).split(":")[0]
    # custom forward: the data cannot be checked, so the layer is named with both possible causes
    with pytest.raises(ValueError, match=r"layer '2'.*NaN or Inf.*calibration data or the model"):
        popcomp.spectral_prune(model, [(bad,)], widths=0.5, progress=False,
                               forward=lambda mod, b: mod(b[0]))
    # finite but huge activations overflow a float32 accumulator: said so, with the way out
    with pytest.raises(ValueError, match=r"layer '2'.*NaN or Inf.*float32 accumulator.*float64"):
        popcomp.spectral_prune(model, X * 1e22, widths=0.5, dtype=torch.float32, progress=False)
    popcomp.spectral_prune(model, X * 1e22, widths=0.5, dtype=F64, progress=False)


def _consumer_formula(model, prod, cons, J, X, tau=0.0):
    """Output of a model ending in ``cons`` pruned at ``prod`` by the paper's formula: the
    consumer applied to ``A_J phi_J``, phi = its input in the original model, read as
    (samples, m channels, positions), A_J from the covariance of exactly that phi."""
    store = []
    h = model[cons].register_forward_pre_hook(lambda mod, a: store.append(a[0].detach()))
    with torch.no_grad():
        model(X)
    h.remove()
    m = model[prod].out_features if isinstance(model[prod], nn.Linear) else model[prod].out_channels
    phi = store[0].reshape(X.shape[0], m, -1)  # channel-major, as Flatten lays them out
    S = torch.einsum("bcp,bdp->cd", phi, phi) / (phi.shape[0] * phi.shape[2])
    A = P.reconstruction(S, J, tau)
    W = model[cons].weight.detach().reshape(model[cons].out_features, m, -1)
    Wn = torch.einsum("ocp,cj->ojp", W, A).reshape(W.shape[0], -1)
    return phi[:, J].reshape(X.shape[0], -1) @ Wn.T + model[cons].bias.detach()


@pytest.mark.parametrize("case", ["linear-flatten-tanh", "conv-flatten-relu", "linear-flatten-bn-relu",
                                  "conv-relu-adaptivepool-flatten"])
def test_layers_after_flatten_enter_the_covariance(case):
    # Flatten commutes with element-wise layers (and BatchNorm1d(m) when positions = 1): the
    # covariance must be that of the consumer's input, after them, not the Flatten's input
    torch.manual_seed(11)
    lin = case.startswith("linear")
    X = torch.randn(300, 5, dtype=F64) if lin else torch.randn(40, 3, 6, 6, dtype=F64)
    layers = {
        "linear-flatten-tanh": [nn.Linear(5, 8), nn.Flatten(), nn.Tanh(), nn.Linear(8, 2)],
        "conv-flatten-relu": [nn.Conv2d(3, 6, 3), nn.Flatten(), nn.ReLU(), nn.Linear(6 * 16, 2)],
        "linear-flatten-bn-relu": [nn.Linear(5, 8), nn.Flatten(), nn.BatchNorm1d(8), nn.ReLU(),
                                   nn.Linear(8, 2)],
        "conv-relu-adaptivepool-flatten": [nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                           nn.Flatten(), nn.Linear(6, 2)],
    }[case]
    model = _randomize_bn(nn.Sequential(*layers).double().eval(), 2)
    cons = len(model) - 1
    assert [(s.name, s.consumer) for s in P.find_sites(model)] == [("0", str(cons))]
    pm, rep = popcomp.spectral_prune(model, X, widths=[4], tau=0.0, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(pm(X), _consumer_formula(model, 0, cons, rep.layers[0].indices, X))


def test_pooling_over_units_or_flattened_features_is_not_a_site():
    # pooling reads neighbouring *units* when they lie on the pooled axis: after a Flatten
    # (windows cross channel boundaries) or after a Linear (units on the last axis). The pruned
    # model then pools other neighbours: a silently wrong result, so no site there
    conv_flat_pool = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                   nn.AvgPool1d(3, stride=1, padding=1), nn.Linear(4 * 16, 2))
    lin_pool = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.MaxPool1d(3, stride=1, padding=1), nn.Linear(8, 2))
    lin_flat_pool = nn.Sequential(nn.Linear(5, 8), nn.Flatten(), nn.AdaptiveAvgPool1d(8), nn.Linear(8, 2))
    # a Linear over the last axis of a 3-D input, flattened: (B, T, m) -> t * m + c, not channel-major
    lin3d_flat = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4, 2))
    for model, x in ((conv_flat_pool, torch.randn(16, 3, 6, 6)), (lin_pool, torch.randn(30, 5)),
                     (lin_flat_pool, torch.randn(30, 5)), (lin3d_flat, torch.randn(30, 4, 5))):
        assert P.find_sites(model) == [], model
        with pytest.raises(ValueError, match="no layer to prune"):
            popcomp.spectral_prune(model, x, widths=0.5, progress=False)
    # pooling over the spatial axes of Conv2d channels, before the Flatten, still is fine
    ok = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
    assert [s.name for s in P.find_sites(ok)] == ["0"]


@pytest.mark.parametrize("norm", [lambda m: nn.BatchNorm1d(m), lambda m: nn.PReLU(m)])
def test_norm_over_the_time_axis_of_a_3d_linear_output_is_not_a_site(norm):
    # BatchNorm1d(m) / PReLU(m) act on dim 1. After a Linear on a (B, T, m) input that is T (here
    # T == m, so the original model runs), not the m units on the last axis: cutting them by unit
    # index permutes or breaks the per-position parameters (silently wrong with every unit kept,
    # a RuntimeError otherwise), so the site is not prunable for such data
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), norm(6), nn.ReLU(), nn.Linear(6, 2)).double()
    if isinstance(model[1], nn.BatchNorm1d):
        _randomize_bn(model[1], 1)
    else:
        with torch.no_grad():
            model[1].weight.copy_(torch.linspace(-0.5, 0.5, 6, dtype=F64))
    model.eval()
    x3 = torch.randn(40, 6, 5, dtype=F64)
    assert [s.name for s in P.find_sites(model)] == ["0"]  # structure alone cannot tell
    assert P.find_sites(model, x3) == []
    for widths in (0.5, 1.0):
        with pytest.raises(ValueError, match="no layer to prune"):
            popcomp.spectral_prune(model, x3, widths=widths, progress=False)
    with pytest.raises(ValueError, match="cannot be pruned"):
        popcomp.spectral_prune(model, [x3], widths={"0": 3}, progress=False)
    # a (B, m) input: the norm is over the units, pruned with them as before
    x2 = torch.randn(200, 5, dtype=F64)
    assert [s.norms for s in P.find_sites(model, x2)] == [["1"]]
    pm, rep = popcomp.spectral_prune(model, x2, widths=[4], tau=0.0, progress=False)
    J = rep.layers[0].indices
    with torch.no_grad():
        torch.testing.assert_close(pm[1](pm[0](x2)), model[1](model[0](x2))[:, J])
        torch.testing.assert_close(pm(x2), _consumer_formula(model, 0, 3, J, x2))
    # a Linear on a 3-D input without a norm still is a site (units on the last axis)
    plain = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    assert [s.name for s in P.find_sites(plain, x3)] == ["0"]
    pm, _ = popcomp.spectral_prune(plain, x3, widths=[3], progress=False)
    assert pm(x3).shape == (40, 6, 2)
