"""Tests of popcomp.theory against Monte Carlo and the papers' stated guarantees."""
import math

import pytest
import torch
from torch import nn

import popcomp
from popcomp import theory as T
from popcomp.theory.zhang2020 import _preacts

D_, N_ = 50, 80  # bu2020 §5.3


def _wstar(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (d,), generator=g).double() * 2 - 1)


def _sim(trials, seed=0, d=D_, n=N_):
    g = torch.Generator().manual_seed(seed)
    w = _wstar(d)
    X, Y = T.linreg_sample(trials, d, n, w, generator=g)
    W = T.linreg_erm(X, Y)
    return g, w, X, Y, W


def test_lemma3_matches_monte_carlo():
    # 20000 trials; the formula must lie within 4 standard errors of the MC mean (the
    # probability of a false failure is < 1e-4 under the CLT).
    _, w, X, Y, W = _sim(20000, seed=1)
    gen = T.linreg_population_risk(W, w) - T.linreg_empirical_risk(W, X, Y)
    mean, se = float(gen.mean()), float(gen.std() / math.sqrt(gen.numel()))
    exact = T.lemma3_generalization_error(D_, N_)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    # another geometry, non-identity noise variance
    g = torch.Generator().manual_seed(2)
    w5 = torch.randn(5, generator=g, dtype=torch.float64)
    X, Y = T.linreg_sample(40000, 5, 12, w5, noise_var=2.0, generator=g)
    W = T.linreg_erm(X, Y)
    gen = T.linreg_population_risk(W, w5, 2.0) - T.linreg_empirical_risk(W, X, Y)
    mean, se = float(gen.mean()), float(gen.std() / math.sqrt(gen.numel()))
    assert abs(mean - T.lemma3_generalization_error(5, 12, 2.0)) < 4 * se


def test_lemma3_rejects_small_n():
    with pytest.raises(ValueError, match="n > d"):
        T.lemma3_generalization_error(50, 51)


def _se(x):
    return float(x.std()) / math.sqrt(x.numel())


def test_theorem4_distortion_at_rate_zero_is_the_erm_error():
    # eq. (23) at R = 0 is dσ'²/(n − d − 1) = E‖W − w*‖²_{Σ_X}, the distortion of the trivial
    # reconstruction; Monte Carlo of the ERM error (Σ_X = I, σ'² = 1.5)
    g = torch.Generator().manual_seed(11)
    w = _wstar(D_)
    X, Y = T.linreg_sample(4000, D_, N_, w, noise_var=1.5, generator=g)
    err = ((T.linreg_erm(X, Y) - w) ** 2).sum(-1)
    assert abs(float(err.mean()) - float(T.theorem4_distortion_upper(0.0, D_, N_, 1.5))) < 4 * _se(err)


def test_theorem4_oracle_achieves_the_distortion_rate_bounds():
    # Theorem 4 is proved by the Oracle (eq. 25): at target D it is a Gaussian test channel
    # Ŵ = (1−α)W + αw* + Z, Z ~ N(0, (1−α)D/d I), whose rate for the Gaussian W_G with W's
    # covariance is I_G = (d/2) ln(Var Ŵ_i / Var Z_i) ≥ I(W;Ŵ). Monte Carlo: (i) the distortion
    # E[L_S(Ŵ) − L_S(W)] is ≤ D (eq. 23 read at R = R(D)) and equals D(1 − α(d+1)/n), derived
    # independently from E[(XXᵀ)⁻¹] = I/(n−d−1); (ii) I_G measured from the sample variance of Ŵ
    # is ≤ the R(D) bound of eq. (22) (and equal to it up to Monte-Carlo error).
    g, w, X, Y, W = _sim(4000, seed=3)
    LS_W = T.linreg_empirical_risk(W, X, Y)
    for R in [0.0, 5.0, 20.0, 60.0]:
        D = float(T.theorem4_distortion_upper(R, D_, N_))
        What = T.oracle_compress(W, w, rate=R, n=N_, generator=g)
        dist = T.linreg_empirical_risk(What, X, Y) - LS_W
        mean, se = float(dist.mean()), _se(dist)
        assert mean - 4 * se <= D
        a = math.exp(-2 * R / D_)
        assert abs(mean - D * (1 - a * (D_ + 1) / N_)) < 4 * se + 1e-12
        if R > 0:
            s = ((What - What.mean(0)) ** 2).mean(-1)  # per-trial mean squared deviation
            v, vse = float(s.mean()), _se(s)
            rate_mc = D_ / 2 * math.log(v / ((1 - a) * D / D_))
            tol = D_ / 2 * 4 * vse / v
            R_of_D = float(T.theorem4_rate_upper(D, D_, N_))
            assert rate_mc <= R_of_D + tol and abs(rate_mc - R_of_D) < tol, (R, rate_mc, R_of_D, tol)


def test_theorem3_holds_at_an_upper_bound_on_the_rate():
    # Theorem 3 (eq. 19) needs I(W;Ŵ); we use quantities that provably bound it from above:
    # the Oracle's Gaussian rate R, and for K-means with centres stored at resolution Δ the
    # Monte-Carlo bound of quantizer_rate_upper. C(w*) = the largest ‖Ŵ − w*‖² seen.
    g, w, X, Y, W = _sim(3000, seed=4)
    for R in [0.5, 2.0, 10.0]:
        What = T.oracle_compress(W, w, rate=R, n=N_, generator=g)
        gen = T.linreg_population_risk(What, w) - T.linreg_empirical_risk(What, X, Y)
        C = float(((What - w) ** 2).sum(-1).max())
        assert float(gen.mean()) - 3 * _se(gen) <= float(T.theorem3_bound(R, N_, C))
    for K in [1, 2, 3, 4]:
        res = popcomp.kmeans1d(W, K, method="exact")
        What = T.discretize(res.dequantize(), 1e-3)
        gen = T.linreg_population_risk(What, w) - T.linreg_empirical_risk(What, X, Y)
        rate = T.quantizer_rate_upper(res.labels, res.centers, 1e-3)["rate"]
        C = float(((What - w) ** 2).sum(-1).max())
        assert rate > 0
        assert float(gen.mean()) - 3 * _se(gen) <= float(T.theorem3_bound(rate, N_, C)), K


def test_description_length_is_not_a_rate_for_theorem3():
    # K = 1: the labels' description length is 0, so Theorem 3 "at that rate" would say gen <= 0;
    # the measured generalization error of Ŵ = mean(W)·1 is 0.31 ± 0.002 (d = 3, n = 8), many
    # standard errors above 0. With the honest rate (the centre at resolution 1e-3) it holds.
    g = torch.Generator().manual_seed(12)
    d, n = 3, 8
    w = _wstar(d, seed=1)
    X, Y = T.linreg_sample(20000, d, n, w, generator=g)
    W = T.linreg_erm(X, Y)
    res = popcomp.kmeans1d(W, 1, method="exact")
    What = T.discretize(res.dequantize(), 1e-3)
    gen = T.linreg_population_risk(What, w) - T.linreg_empirical_risk(What, X, Y)
    desc_len = float((d * T.label_entropy(res.labels, 1)).mean())
    C = float(((What - w) ** 2).sum(-1).max())
    assert desc_len == 0.0
    assert float(gen.mean()) - 5 * _se(gen) > float(T.theorem3_bound(desc_len, n, C))
    rate = T.quantizer_rate_upper(res.labels, res.centers, 1e-3)["rate"]
    assert float(gen.mean()) <= float(T.theorem3_bound(rate, n, C))


def test_corollary1_bounds_the_oracle_population_risk_excess():
    # eq. (26): the best compressor at rate R has E[L_μ(Ŵ) − L_S(W)] ≤ 2σ*²√(R/n) + D(R); the
    # Oracle at rate R (I(W;Ŵ) ≤ R) is one such compressor, so its Monte-Carlo excess must lie
    # below the bound; at R = 0 (Ŵ = w*) the excess is E[L_μ(w*) − L_S(W)] = σ'²d/n, and the
    # bound is D(0) = dσ'²/(n−d−1) ≥ that.
    g, w, X, Y, W = _sim(3000, seed=5)
    LS_W = T.linreg_empirical_risk(W, X, Y)
    for R in [0.0, 2.0, 10.0, 40.0]:
        What = T.oracle_compress(W, w, rate=R, n=N_, generator=g)
        ex = T.linreg_population_risk(What, w) - LS_W
        C = float(((What - w) ** 2).sum(-1).max())
        assert float(ex.mean()) - 3 * _se(ex) <= float(T.corollary1_bound(R, D_, N_, C)), R
        if R == 0.0:
            assert abs(float(ex.mean()) - D_ / N_) < 4 * _se(ex)


def test_integer_entropy_upper_is_massey_bound():
    # against the exact entropy of a discretized Gaussian N = round(c/Δ), c ~ N(0, s²): the bound
    # is above it, and within 1e-3 nats of it once the variance is large (the bound is tight)
    for s in [0.3, 1.0, 3.0, 30.0]:
        k = torch.arange(-int(12 * s) - 3, int(12 * s) + 4, dtype=torch.float64)
        cdf = lambda x: 0.5 * (1 + torch.erf(x / (s * math.sqrt(2))))  # noqa: E731
        p = cdf(k + 0.5) - cdf(k - 0.5)
        p = p[p > 0]
        H = float(-(p * p.log()).sum())
        var = float((p * k[: p.numel()] ** 2).sum()) if p.numel() == k.numel() else s * s
        ub = float(T.integer_entropy_upper(var))
        assert H <= ub + 1e-12
        if s >= 1.0:
            assert ub - H < 1e-3, (s, H, ub)
    with pytest.raises(ValueError, match="var"):
        T.integer_entropy_upper(-1.0)


def test_plugin_entropy_upper_corrects_the_plugin_bias():
    # 4000 independent coordinates, each uniform on 4 values, seen T = 10 times: the plug-in
    # entropy is biased low (about (k−1)/(2T) per coordinate); with Paninski's correction the
    # mean lies above H = ln 4 per coordinate.
    g = torch.Generator().manual_seed(13)
    d, Tn, k = 4000, 10, 4
    lab = torch.randint(0, k, (Tn, d), generator=g)
    up = float(T.plugin_entropy_upper(lab, k)) / d
    plug = up - math.log1p((k - 1) / Tn)
    assert plug < math.log(k) < up
    # the full rate bound on a quantizer with known entropy: L_i ~ Bernoulli(p_i) independent,
    # two centres c_k ~ N(m_k, s_k²) stored at Δ; H(L, N) = Σ h(p_i) + Σ H(N_k)
    Tn, d, delta = 4000, 20, 1e-3
    p = torch.linspace(0.05, 0.5, d, dtype=torch.float64)
    lab = (torch.rand(Tn, d, generator=g, dtype=torch.float64) < p).long()
    sd = torch.tensor([0.02, 0.05], dtype=torch.float64)
    cen = torch.tensor([-1.0, 1.0], dtype=torch.float64) + sd * torch.randn(Tn, 2, generator=g, dtype=torch.float64)
    H_lab = float(-(p * p.log() + (1 - p) * (1 - p).log()).sum())
    H_cen = float((0.5 * torch.log(2 * math.pi * math.e * (sd / delta) ** 2)).sum())  # fine grid: exact to 1e-6
    r = T.quantizer_rate_upper(lab, cen, delta)
    # Monte-Carlo tolerance: s.e. of the plug-in sum (≈ sqrt(Σ Var(ln p(L_i)) / T)) and of the
    # log-variance (sqrt(2/T) per centre), plus the known margins
    se_lab = math.sqrt(float((p * (1 - p) * torch.log(p / (1 - p)) ** 2).sum()) / Tn)
    se_cen = 2 * 0.5 * math.sqrt(2 / Tn)
    assert r["labels_part"] >= H_lab - 4 * se_lab
    assert abs(r["labels_part"] - H_lab) < 4 * se_lab + d * math.log1p(1 / Tn)
    assert r["centres_part"] >= H_cen - 4 * se_cen
    assert abs(r["centres_part"] - H_cen) < 4 * se_cen + 2 * 0.5 * 3 * math.sqrt(2 / (Tn - 1)) + 1e-3
    assert r["rate"] == pytest.approx(r["labels_part"] + r["centres_part"])


def test_theorem1_shapes():
    b = T.theorem1_bound(1.0, 100, mi_compressed=torch.tensor([0.0, 2.0]), mi_data=3.0)
    assert torch.allclose(b, torch.tensor([0.0, math.sqrt(2 * 2.0 / 100)], dtype=b.dtype))
    R = torch.linspace(0, 100, 11, dtype=torch.float64)
    c = T.corollary1_bound(R, D_, N_, C=2.0)
    assert torch.isfinite(c).all()


@pytest.mark.parametrize("shape", [(40, 30), (17, 64)])
def test_lemma44_svd_truncation(shape):
    g = torch.Generator().manual_seed(5)
    # decaying spectrum
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64))
    r = min(shape)
    s = torch.exp(-0.2 * torch.arange(r, dtype=torch.float64))
    A = U[:, :r] @ torch.diag(s) @ V[:, :r].T
    for delta in [0.05, 0.2, 0.5, 0.9]:
        At, rank = T.svd_truncate(A, delta)
        assert T.spectral_norm(At - A) <= delta * T.spectral_norm(A) + 1e-12
        assert rank <= T.stable_rank(A) / delta ** 2 + 1e-9
        assert rank == torch.linalg.matrix_rank(At).item()
    assert 1 <= T.stable_rank(A) <= r


def test_low_rank_linear_is_two_layers_and_matches_truncation():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    lr = T.low_rank_linear(lin, delta=0.5)
    assert isinstance(lr.first, nn.Linear) and isinstance(lr.second, nn.Linear)
    At, rank = T.svd_truncate(lin.weight.detach(), 0.5)
    assert lr.rank == rank
    x = torch.randn(5, 32)
    assert torch.allclose(lr(x), x @ At.T + lin.bias, atol=1e-5)
    assert sum(p.numel() for p in lr.parameters()) == rank * (32 + 24) + 24
    full = T.low_rank_linear(lin, rank=24)
    assert torch.allclose(full(x), lin(x), atol=1e-5)


def test_lemma45_random_projection_guarantee():
    # h1 x h2 = 12 x 10, m = 6 pairs (U: n x h1 with n = 4), eps = 0.5, delta = 0.1.
    # Lemma 4.5: with probability >= 1 - delta over the helper string, every pair satisfies
    # ||U (Ahat - A) x|| <= eps ||U||_F ||A||_F ||x||. Over 40 helper strings the failure
    # count is Binomial(40, <= 0.1): P(>= 12 failures) < 1e-3.
    g = torch.Generator().manual_seed(7)
    A = torch.randn(12, 10, generator=g, dtype=torch.float64)
    G = [(torch.randn(4, 12, generator=g, dtype=torch.float64),
          torch.randn(10, generator=g, dtype=torch.float64)) for _ in range(6)]
    eps, delta = 0.5, 0.1
    fails = 0
    for seed in range(40):
        Ah, k = T.random_projection_compress(A, eps, delta=delta, m=6, n=4, seed=seed)
        assert k == math.ceil(8 * math.log(1 / (delta / 24)) / eps ** 2)
        ok = all(float((U @ (Ah - A) @ x).norm()) <= eps * float(U.norm() * A.norm() * x.norm())
                 for U, x in G)
        fails += not ok
    assert fails < 12
    # same helper string -> same compression; the estimator is unbiased-ish for large k
    a1, _ = T.random_projection_compress(A, 0.5, k=50, seed=3)
    a2, _ = T.random_projection_compress(A, 0.5, k=50, seed=3)
    assert torch.equal(a1, a2)


def test_noise_sensitivity_matches_prop53():
    g = torch.Generator().manual_seed(8)
    M = torch.randn(6, 9, generator=g, dtype=torch.float64)
    x = torch.randn(3, 9, generator=g, dtype=torch.float64)
    mc = T.noise_sensitivity(lambda v: v @ M.T, x, samples=4000, seed=1)
    exact = T.noise_sensitivity_gaussian_matrix(M, x)
    assert torch.allclose(mc, exact, rtol=0.1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def test_cushions_and_effective_params():
    model = _mlp()
    x = torch.randn(64, 8)
    cu = T.mlp_cushions(model, x)
    for mu in cu["layer_cushion"]:
        assert 0 < mu <= 1 + 1e-9
    # noise sensitivity at a layer input is 1/mu^2 per sample (Prop. 5.3)
    cmin = T.mlp_cushions(model, x, reduce="min")
    for ns, mu in zip(cmin["noise_sensitivity"], cmin["layer_cushion"]):
        assert abs(ns - 1 / mu ** 2) < 1e-6 * ns
    assert abs(cu["interlayer_cushion"][0][0] - 1 / 4) < 1e-12
    assert 0 < cu["activation_contraction"] <= 1
    # J^{i,j} x^i = x^j without biases: check interlayer cushion on a biasless net
    nb = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False))
    c2 = T.mlp_cushions(nb, x)
    ins, outs = _preacts(nb, x)
    J = nb[2].weight.double().unsqueeze(0) * (outs[0] > 0).double().unsqueeze(1)
    assert torch.allclose((J @ outs[0].double().unsqueeze(-1)).squeeze(-1), outs[1].double(), atol=1e-5)
    e51 = T.effective_params_thm51(model, x, gamma=1.0)
    e57 = T.effective_params_thm57(model, x, gamma=1.0)
    assert e51 > 0 and e57 > 0 and math.isfinite(e51) and math.isfinite(e57)


def test_suzuki_dof_lambda_width_and_delta2():
    mu = torch.tensor([10.0, 1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    cov = Q @ torch.diag(mu) @ Q.T
    assert abs(float(T.degrees_of_freedom(cov, 0.1)) - float((mu / (mu + 0.1)).sum())) < 1e-9
    big = torch.exp(-0.1 * torch.arange(300, dtype=torch.float64))
    for w in [60, 150, 250]:
        lam = T.lambda_for_width(big, w)
        N = float(T.degrees_of_freedom(big, lam))
        assert w >= 5 * N * math.log(80 * N) - 1e-6
        N2 = float(T.degrees_of_freedom(big, lam * 0.99))
        assert w < 5 * N2 * math.log(80 * N2)
    d_small = T.suzuki_delta2([8, 4, 3], 100, R=2.0, R_b=1.0, D_x=3.0)
    d_big = T.suzuki_delta2([8, 16, 3], 100, R=2.0, R_b=1.0, D_x=3.0)
    assert 0 < d_small < d_big
    assert T.suzuki_bias_proxy([0.04, 0.09]) == pytest.approx(0.5)


def test_spectral_capacity_and_table1():
    model = _mlp()
    x = torch.randn(200, 8)
    y = torch.randint(0, 3, (200,))
    cap = T.spectral_capacity(model, x, ratio=0.5)
    assert cap["widths_pruned"] == [8, 8, 6, 3]
    assert cap["delta2"] < cap["delta2_original"]
    rows = T.intrinsic_dimensionality_table(model, x, y)
    assert len(rows) == 3 and all(r["spec_prun"] <= r["original"] + 1e-9 for r in rows)
    assert all(math.isfinite(r["arora"]) for r in rows)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    rows = T.intrinsic_dimensionality_table(cnn, torch.randn(20, 1, 8, 8))
    assert rows[0]["original"] == 36 and math.isnan(rows[0]["arora"])


def test_layer_covariances_are_second_moments_of_the_layer_inputs():
    # against a direct float64 computation on the inputs of an eval-mode run: a Conv2d (channels,
    # every position a sample), a Conv1d (likewise), a Linear on (B, C, L) inputs (its last
    # axis); dropout is off during the pass and every module's own mode is restored after
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(2), nn.Conv1d(3, 4, 2),
                          nn.ReLU(), nn.Linear(19, 6))
    model.train()
    model[0].eval()  # mixed modes; the Dropout is in train mode
    modes = [m.training for m in model.modules()]
    xs = [torch.randn(5, 2, 6, 7), torch.randn(3, 2, 6, 7)]
    got = T.layer_covariances(model, [(x, torch.zeros(len(x))) for x in xs])
    assert [m.training for m in model.modules()] == modes
    ins = {0: [], 4: [], 6: []}
    hooks = [model[i].register_forward_pre_hook(lambda mod, a, i=i: ins[i].append(a[0].double())) for i in ins]
    model.eval()
    with torch.no_grad():
        for x in xs:
            model(x)
    for h in hooks:
        h.remove()
    assert [c["layer"] for c in got] == ["0", "4", "6"]
    for c, i in zip(got, (0, 4, 6)):
        a = torch.cat([t.movedim(1, -1).reshape(-1, t.shape[1]) if i != 6 else t.reshape(-1, t.shape[-1])
                       for t in ins[i]])
        torch.testing.assert_close(c["cov"], a.T @ a / a.shape[0], rtol=1e-12, atol=1e-12)
        assert c["cov"].dtype == torch.float64 and c["n"] == a.shape[0] and c["n_inputs"] == 8
        assert c["max_input_norm"] == pytest.approx(max(float(t.flatten(1).norm(dim=1).max()) for t in ins[i]))


def test_oracle_printed_convention_gives_distortion_D():
    # with α = nD/(dσ'²) as printed under eq. (25), E[d_S] = D exactly (for D ≤ dσ'²/n)
    g, w, X, Y, W = _sim(4000, seed=9)
    D = 0.3
    What = T.oracle_compress(W, w, D=D, n=N_, convention="printed", generator=g)
    dist = T.linreg_empirical_risk(What, X, Y) - T.linreg_empirical_risk(W, X, Y)
    assert abs(float(dist.mean()) - D) < 4 * float(dist.std()) / math.sqrt(dist.numel())
    with pytest.raises(ValueError, match="alpha"):
        T.oracle_compress(W, w, D=1.0, n=N_, convention="printed")


def test_cushions_reject_non_mlp():
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 36, 3))
    with pytest.raises(ValueError, match="MLPs"):
        T.mlp_cushions(cnn, torch.randn(4, 1, 8, 8))


def test_eq12_and_theorem2():
    R = torch.tensor([0.0, 10.0], dtype=torch.float64)
    b = T.theorem2_bound(R, 2.0, N_, lambda r: T.theorem4_distortion_upper(r, D_, N_))
    exp = torch.sqrt(2 * 2.0 / N_ * R) + T.theorem4_distortion_upper(R, D_, N_)
    assert torch.allclose(b, exp)
    assert float(T.eq12_bound(1.0, 100, 2.0, 0.5)) == pytest.approx(math.sqrt(0.04) + 0.5)


def test_bu2020_noise_variance_is_checked():
    for f in (lambda: T.theorem4_rate_upper(0.5, 50, 80, noise_var=-1.0),
              lambda: T.theorem4_distortion_upper(1.0, 50, 80, noise_var=-1.0),
              lambda: T.corollary1_bound(1.0, 50, 80, C=1.0, noise_var=float("nan")),
              lambda: T.oracle_alpha(0.5, 50, 80, noise_var=0.0),
              lambda: T.oracle_alpha(-0.5, 50, 80),
              lambda: T.linreg_sample(2, 5, 10, torch.zeros(5, dtype=torch.float64), noise_var=-1.0)):
        with pytest.raises(ValueError, match="noise_var|D must"):
            f()


@pytest.mark.parametrize("bad", [torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("inf")]),
                                 torch.tensor([[1.0, 0.0], [0.0, float("nan")]])])
def test_suzuki_non_finite_covariance_raises(bad):
    # lambda_for_width bisected forever on NaN/Inf eigenvalues; eigvalsh of a NaN matrix
    # returned numbers
    for f in (lambda: T.lambda_for_width(bad, 1), lambda: T.width_for_lambda(bad, 0.1),
              lambda: T.degrees_of_freedom(bad, 0.1)):
        with pytest.raises(ValueError, match="cov_or_eigs"):
            f()


def test_suzuki_norm_bounds_paper_definition():
    # a layer built on the boundary of the paper's class (§4): rows of norm R/√m_out and
    # ‖b‖_∞ = R_b/√m_out give back exactly (R, R_b); a second, smaller layer does not change them
    g = torch.Generator().manual_seed(14)
    R, R_b = 2.5, 0.7
    big, small = nn.Linear(7, 12), nn.Linear(12, 3)
    with torch.no_grad():
        W = torch.randn(12, 7, generator=g)
        big.weight.copy_(W / W.norm(dim=1, keepdim=True) * R / math.sqrt(12))
        big.bias.copy_(torch.linspace(-1, 0.5, 12) * R_b / math.sqrt(12))
        small.weight.mul_(1e-3)
        small.bias.zero_()
    nb = T.suzuki_norm_bounds(nn.Sequential(big, nn.ReLU(), small))
    assert nb["R"] == pytest.approx(R, rel=1e-6) and nb["R_b"] == pytest.approx(R_b, rel=1e-6)
    op = T.suzuki_norm_bounds([big, small], definition="operator")
    assert op["R"] == pytest.approx(float(torch.linalg.matrix_norm(big.weight.detach().double(), 2)))
    assert op["R_b"] == pytest.approx(float(big.bias.detach().double().norm()))
    with pytest.raises(ValueError, match="definition"):
        T.suzuki_norm_bounds([big], definition="frobenius")
    cap = T.spectral_capacity(nn.Sequential(big, nn.ReLU(), small), torch.randn(50, 7, generator=g), ratio=0.5)
    assert cap["norms"] == "paper" and cap["R"] == pytest.approx(R, rel=1e-6)


def test_spectral_prune_reports_theorem1_leverage_constraint():
    # Σ_{j∈J} τ̃_j⁻¹ <= (5/3) m m♯ (Theorem 1). Units 5..9 of a 10-unit layer carry activations
    # ~1e-3 of the others, so their leverage scores are tiny: keeping 5 units satisfies the
    # constraint, keeping 8 forces three tiny units in and violates it (reported and warned).
    from popcomp.spectral.quantities import leverage_constraint, leverage_scores

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        m[0].weight[5:] *= 1e-3
        m[0].bias[5:] *= 1e-3
    x = torch.randn(400, 6)
    _, rep = popcomp.spectral_prune(m, [x], widths={"0": 5}, progress=False)
    l5 = rep.layers[0]
    assert l5.leverage_ok and l5.leverage_limit == pytest.approx(5 / 3 * 10 * 5)
    with pytest.warns(UserWarning, match="leverage constraint"):
        _, rep = popcomp.spectral_prune(m, [x], widths={"0": 8}, progress=False)
    l8 = rep.layers[0]
    assert not l8.leverage_ok and l8.leverage_inv_sum > l8.leverage_limit == pytest.approx(5 / 3 * 10 * 8)
    # against the definition, from the layer's input covariance
    h = torch.relu(m[0](x)).detach().double()
    lev = leverage_scores(h.T @ h / h.shape[0], l8.lam)
    assert l8.leverage_inv_sum == pytest.approx(float((1 / lev[l8.indices]).sum()), rel=1e-6)
    assert leverage_constraint(torch.tensor([0.5, 0.25, 0.25]), [1, 2]) == (8.0, 5 / 3 * 3 * 2)
    assert leverage_constraint(torch.tensor([0.5, 0.5, 0.0]), [1, 2]) == (2.0, 5 / 3 * 3 * 2)  # dead unit neglected
