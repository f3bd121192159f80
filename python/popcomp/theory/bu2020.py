"""Bu, Gao, Zou, Veeravalli, *Information-theoretic understanding of population risk improvement with model compression* (AAAI 2020): the linear-regression theory and bounds, with their equation numbers.

Theorem 1 (eq. 10), eq. (12)/(28), Theorem 2 (eq. 13), Lemma 3 (eq. 17), Theorem 3 (eq. 19),
Theorem 4 (eqs. 22-23), the Oracle compressor (eq. 25), Corollary 1 (eq. 26), the linear
model of eq. (14) (sampling, ERM of eq. 16, exact population and empirical risks), and a
Monte-Carlo upper bound on the rate I(W;Ŵ) of a K-means quantizer whose centres are stored at a
finite resolution (:func:`quantizer_rate_upper`). All logarithms are natural: mutual
informations and rates are in **nats**. Plain torch, any device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import as_t as _as_t, check_pos as _check_pos

__all__ = [
    "theorem1_bound", "eq12_bound", "theorem2_bound", "lemma3_generalization_error", "sigma_ell_sq",
    "theorem3_bound", "theorem4_rate_upper", "theorem4_distortion_upper", "corollary1_bound",
    "oracle_alpha", "oracle_compress", "linreg_sample", "linreg_erm", "linreg_population_risk",
    "linreg_empirical_risk", "label_entropy", "discretize", "integer_entropy_upper",
    "plugin_entropy_upper", "quantizer_rate_upper",
]


def _check_linreg_dims(d: int, n: int) -> None:
    if int(d) != d or d < 1:
        raise ValueError(f"d must be a positive integer, got {d}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if not n > d + 1:
        raise ValueError(
            f"bu2020 Lemma 3 / Theorem 4 need n > d + 1 (the inverse-Wishart mean exists); "
            f"got d = {d}, n = {n}"
        )


def _nonneg_t(name: str, x) -> torch.Tensor:
    """``x`` as a tensor (:func:`_as_t`), every entry >= 0; errors name ``name``."""
    t = _as_t(x)
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0")
    return t


def theorem1_bound(sigma2: float, n: int, mi_compressed=float("inf"), mi_data=float("inf")):
    """bu2020 Theorem 1, eq. (10): |gen(μ, P_{Ŵ|S})| ≤ √(2σ²/n · min{I(W;Ŵ), I(S;W)}).

    ``sigma2`` is σ² of the σ-sub-Gaussian loss; informations in nats. Works elementwise on
    tensors. With both informations infinite the bound is infinite (vacuous).
    """
    _check_pos("sigma2", sigma2, strict=False)
    _check_pos("n", n)
    mi = torch.minimum(_as_t(mi_compressed), _as_t(mi_data))
    if bool((mi < 0).any()):
        raise ValueError("mutual informations must be >= 0")
    return torch.sqrt(2.0 * sigma2 / n * mi)


def eq12_bound(sigma2: float, n: int, mi_compressed, distortion):
    """bu2020 eq. (12) / (28): E[L_μ(Ŵ) − L_S(W)] ≤ √(2σ²/n · I(W;Ŵ)) + E[d_S(Ŵ, W)] =: 𝓛_{S,W},
    the quantity DRHW K-means is designed to lower (I in nats)."""
    return theorem1_bound(sigma2, n, mi_compressed) + _as_t(distortion)


def theorem2_bound(R, sigma2: float, n: int, distortion_rate):
    """bu2020 Theorem 2, eq. (13): min_{I(W;Ŵ)=R} E[L_μ(Ŵ) − L_S(W)] ≤ √(2σ²R/n) + D(R), with
    D(R) given (a number, tensor, or a callable of R such as :func:`theorem4_distortion_upper`)."""
    R = _as_t(R)
    D = distortion_rate(R) if callable(distortion_rate) else _as_t(distortion_rate)
    return theorem1_bound(sigma2, n, R) + D


def lemma3_generalization_error(d: int, n: int, noise_var: float = 1.0) -> float:
    """bu2020 Lemma 3, eq. (17): exact generalization error of least squares (ERM, eq. 16)

        gen(μ, P_{W|S}) = σ'² d / n · (2 + (d + 1) / (n − d − 1)),   n > d + 1,

    for X_i ~ N(0, Σ_X) (any Σ_X) and Gaussian noise of variance σ'² = ``noise_var``.
    """
    _check_linreg_dims(d, n)
    s = _check_pos("noise_var", noise_var)
    return s * d / n * (2.0 + (d + 1.0) / (n - d - 1.0))


def sigma_ell_sq(C: float, sigma_x_norm: float = 1.0, noise_var: float = 1.0) -> float:
    """bu2020 Theorem 3: σ*_ℓ² = C(w*)·‖Σ_X‖ + σ'², with C(w*) = sup_{ŵ∈Ŵ} ‖ŵ − w*‖² (eq. 18)."""
    return _check_pos("C", C, strict=False) * _check_pos("sigma_x_norm", sigma_x_norm) + \
        _check_pos("noise_var", noise_var)


def theorem3_bound(rate, n: int, C: float, sigma_x_norm: float = 1.0, noise_var: float = 1.0):
    """bu2020 Theorem 3, eq. (19): gen(μ, P_{Ŵ|S}) ≤ 2 σ*_ℓ² √(I(W;Ŵ)/n), rate in nats.

    ``C`` is C(w*) of eq. (18) for the (compact) reconstruction set; in a simulation one uses
    the largest ‖Ŵ − w*‖² observed. Elementwise in ``rate``.
    """
    _check_pos("n", n)
    r = _nonneg_t("rate", rate)
    return 2.0 * sigma_ell_sq(C, sigma_x_norm, noise_var) * torch.sqrt(r / n)


def theorem4_rate_upper(D, d: int, n: int, noise_var: float = 1.0):
    """bu2020 Theorem 4, eq. (22): R(D) ≤ d/2 · (ln(d σ'² / ((n − d − 1) D)))⁺, D ≥ 0 (nats)."""
    _check_linreg_dims(d, n)
    noise_var = _check_pos("noise_var", noise_var, strict=False)
    D = _nonneg_t("D", D)
    v = d * noise_var / (n - d - 1.0)
    return 0.5 * d * torch.clamp(torch.log(v / D), min=0.0)


def theorem4_distortion_upper(R, d: int, n: int, noise_var: float = 1.0):
    """bu2020 Theorem 4, eq. (23): D(R) ≤ d σ'² / (n − d − 1) · exp(−2R/d), R ≥ 0 (nats)."""
    _check_linreg_dims(d, n)
    noise_var = _check_pos("noise_var", noise_var, strict=False)
    R = _nonneg_t("R", R)
    return d * noise_var / (n - d - 1.0) * torch.exp(-2.0 * R / d)


def corollary1_bound(R, d: int, n: int, C: float, sigma_x_norm: float = 1.0,
                     noise_var: float = 1.0):
    """bu2020 Corollary 1, eq. (26): the population-risk bound as a function of the rate R,

        min_{I(W;Ŵ)=R} E[L_μ(Ŵ) − L_S(W)] ≤ 2 σ*_ℓ² √(R/n) + d σ'²/(n − d − 1) · e^{−2R/d}.

    Add E[L_S(W)] = σ'²(n − d)/n to read it as a population risk.
    """
    return theorem3_bound(R, n, C, sigma_x_norm, noise_var) + \
        theorem4_distortion_upper(R, d, n, noise_var)


def oracle_alpha(D, d: int, n: int, noise_var: float = 1.0, convention: str = "consistent"):
    """α of the Oracle compressor (bu2020 eq. 25) for a target distortion D.

    ``"consistent"`` (default): α = (n − d − 1) D / (d σ'²) = D / D(0). This is the Gaussian test
    channel of the reverse water-filling that proves eq. (22): with it I(W_G; Ŵ) = (d/2) ln(1/α)
    equals the bound of eq. (22) exactly, α = 1 at R = 0 (Ŵ = w*, as the paper's §5.3 says), and
    the expected distortion is D·(1 − α(d+1)/n) ≤ D.
    ``"printed"``: α = n D / (d σ'²) as printed under eq. (25); then the expected distortion is
    exactly D but α ≤ 1 only for D ≤ dσ'²/n < D(0), so small rates are out of reach.
    """
    _check_linreg_dims(d, n)
    noise_var = _check_pos("noise_var", noise_var)
    D = _nonneg_t("D", D)
    if convention == "consistent":
        return (n - d - 1.0) * D / (d * float(noise_var))
    if convention == "printed":
        return n * D / (d * float(noise_var))
    raise ValueError(f"convention must be 'consistent' or 'printed', got {convention!r}")


def oracle_compress(W: torch.Tensor, w_star: torch.Tensor, *, rate=None, D=None, n: int,
                    noise_var: float = 1.0, sigma_x: Optional[torch.Tensor] = None,
                    convention: str = "consistent",
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample the Oracle compressor of bu2020 eq. (25):

        Ŵ | W ~ N((1 − α) W + α w*, (1 − α) (D/d) Σ_X⁻¹),

    for W of shape (..., d). Give either ``rate`` R (nats; then D = the bound of eq. (23), so that
    I(W_G;Ŵ) = R with the consistent α) or ``D``. ``sigma_x`` is Σ_X (None: identity). The
    Oracle needs the true w*, so it is a device of the analysis, not a practical compressor.
    """
    W = _as_t(W)
    d = W.shape[-1]
    if (rate is None) == (D is None):
        raise ValueError("give exactly one of rate= or D=")
    if D is None:
        D = theorem4_distortion_upper(rate, d, n, noise_var)
    D = _as_t(D).to(W)
    a = oracle_alpha(D, d, n, noise_var, convention)
    if bool((a > 1).any()) or bool((a < 0).any()):
        raise ValueError(f"alpha = {a.max().item():.4g} outside [0, 1]: D too large for this convention")
    a = a.to(W)
    while a.dim() < W.dim():
        a = a.unsqueeze(-1)
    Dd = (D.to(W) / d)
    while Dd.dim() < W.dim():
        Dd = Dd.unsqueeze(-1)
    gdev = generator.device if generator is not None else W.device
    z = torch.randn(W.shape, generator=generator, dtype=W.dtype, device=gdev).to(W.device)
    if sigma_x is not None:
        # noise with covariance Σ_X⁻¹: solve L^T u = z with Σ_X = L L^T
        L = torch.linalg.cholesky(_as_t(sigma_x).to(W))
        z = torch.linalg.solve_triangular(L.transpose(-1, -2), z.unsqueeze(-1), upper=True).squeeze(-1)
    return (1 - a) * W + a * w_star.to(W) + torch.sqrt((1 - a) * Dd) * z


def linreg_sample(trials: int, d: int, n: int, w_star: torch.Tensor, noise_var: float = 1.0,
                  sigma_x: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None,
                  dtype=torch.float64, device=None):
    """Draw ``trials`` independent training sets of the linear model of bu2020 eq. (14).

    Returns X (trials, n, d) (rows are samples: the paper's X is our Xᵀ), Y (trials, n).
    """
    _check_linreg_dims(d, n)
    noise_var = _check_pos("noise_var", noise_var, strict=False)
    gdev = generator.device if generator is not None else device
    X = torch.randn(trials, n, d, generator=generator, dtype=dtype, device=gdev).to(device)
    if sigma_x is not None:
        L = torch.linalg.cholesky(_as_t(sigma_x).to(dtype=dtype, device=X.device))
        X = X @ L.T
    eps = torch.randn(trials, n, generator=generator, dtype=dtype, device=gdev).to(X.device) * math.sqrt(noise_var)
    Y = X @ w_star.to(X) + eps
    return X, Y


def linreg_erm(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """bu2020 eq. (16): W = (XXᵀ)⁻¹ X Y (batched, rows of X are samples)."""
    XtX = X.transpose(-1, -2) @ X
    return torch.linalg.solve(XtX, (X.transpose(-1, -2) @ Y.unsqueeze(-1))).squeeze(-1)


def linreg_population_risk(w: torch.Tensor, w_star: torch.Tensor, noise_var: float = 1.0,
                           sigma_x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_μ(w) = (w − w*)ᵀ Σ_X (w − w*) + σ'² (eq. 1 for the model of eq. 14, exact)."""
    e = w - w_star.to(w)
    if sigma_x is None:
        q = (e * e).sum(-1)
    else:
        q = ((e @ _as_t(sigma_x).to(w)) * e).sum(-1)
    return q + noise_var


def linreg_empirical_risk(w: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """L_S(w) = ‖Y − Xw‖²/n, eq. (15)."""
    r = Y - (X @ w.unsqueeze(-1)).squeeze(-1)
    return (r * r).mean(-1)


def label_entropy(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Empirical entropy (nats) of the labels along the last dim; (...,) result.

    ``n · label_entropy`` is the entropy-coded description length of the cluster assignment,
    the rate we attribute to K-means (its centers, K floats, are not counted).
    """
    oh = torch.zeros(*labels.shape[:-1], k, dtype=torch.float64, device=labels.device)
    oh.scatter_add_(-1, labels, torch.ones_like(labels, dtype=torch.float64))
    p = oh / labels.shape[-1]
    return -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)


def discretize(x, resolution: float) -> torch.Tensor:
    """``x`` rounded to the grid ``resolution·ℤ`` (each entry moves by at most resolution/2)."""
    r = _check_pos("resolution", resolution)
    x = _as_t(x)
    return torch.round(x / r) * r


def integer_entropy_upper(var) -> torch.Tensor:
    """Massey's bound on the entropy (nats) of an integer-valued random variable N of variance
    ``var``: H(N) ≤ ½ ln(2πe (Var N + 1/12)).

    Proof: with U ~ Unif(−½, ½) independent of N, h(N + U) = H(N), Var(N + U) = Var N + 1/12,
    and the Gaussian maximizes differential entropy at a given variance. Elementwise.
    """
    v = _nonneg_t("var", var)
    return 0.5 * torch.log(2 * math.pi * math.e * (v + 1.0 / 12.0))


def plugin_entropy_upper(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Upper bound (in expectation) on Σ_i H(L_i), nats, from T samples ``labels`` (T, d) of a
    random vector L ∈ {0..k−1}^d: Σ_i [Ĥ_i + ln(1 + (k − 1)/T)], Ĥ_i the plug-in entropy of
    coordinate i over the T samples.

    The plug-in estimator is biased low by at most ln(1 + (k − 1)/T) (Paninski 2003, Prop. 1:
    −ln(1 + (m−1)/N) ≤ E[Ĥ_MLE] − H ≤ 0), so the expectation of the result is ≥ Σ_i H(L_i)
    ≥ H(L) (subadditivity).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (T, d), got shape {tuple(labels.shape)}")
    T = labels.shape[0]
    if T < 2:
        raise ValueError(f"labels needs T >= 2 samples, got {T}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    # per coordinate: counts over the T samples
    cnt = torch.zeros(labels.shape[1], int(k), dtype=torch.float64, device=labels.device)
    cnt.scatter_add_(1, labels.long().T.contiguous(), torch.ones(labels.shape[1], T, dtype=torch.float64,
                                                                 device=labels.device))
    p = cnt / T
    h = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(1)
    return h.sum() + labels.shape[1] * math.log1p((k - 1.0) / T)


def quantizer_rate_upper(labels: torch.Tensor, centers: torch.Tensor, resolution: float,
                         var_margin: float = 3.0) -> dict:
    """A Monte-Carlo upper bound on I(W; Ŵ_Δ), nats, for a scalar quantizer Ŵ_Δ = c_Δ[labels]
    whose K centres are stored on the grid Δ·ℤ (Δ = ``resolution``).

    ``labels`` (T, d) and ``centers`` (T, K) are T independent draws (one per training set) of
    the labels and the (unrounded) centres, the labels indexing the centres in a fixed (e.g.
    ascending) order. Ŵ_Δ is a deterministic function of (L, N) with N_k = round(c_k/Δ), hence

        I(W; Ŵ_Δ) ≤ H(Ŵ_Δ) ≤ H(L) + H(N) ≤ Σ_i H(L_i) + Σ_k H(N_k),

    bounded by :func:`plugin_entropy_upper` (bias-corrected, an upper bound in expectation) and
    :func:`integer_entropy_upper` with Var N_k replaced by its sample variance plus
    ``var_margin`` standard errors (Gaussian approximation of the variance's s.e.). An
    unrounded continuous Ŵ that is a deterministic function of W has I(W; Ŵ) = ∞, so a finite
    resolution is what makes the rate finite; Ŵ_Δ differs from Ŵ by at most Δ/2 per entry.

    Returns ``{"rate", "labels_part", "centres_part"}`` (floats, nats).
    """
    if centers.dim() != 2 or centers.shape[0] != labels.shape[0]:
        raise ValueError(f"centers must be (T, K) with T = labels.shape[0] = {labels.shape[0]}, "
                         f"got shape {tuple(centers.shape)}")
    r = _check_pos("resolution", resolution)
    K = centers.shape[1]
    T = centers.shape[0]
    lab = plugin_entropy_upper(labels, K)
    N = torch.round(centers.double() / r)
    v = N.var(0)
    v = v + float(var_margin) * v * math.sqrt(2.0 / (T - 1))
    cen = integer_entropy_upper(v).sum()
    return {"rate": float(lab + cen), "labels_part": float(lab), "centres_part": float(cen)}
