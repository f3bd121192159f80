"""Bounds and diagnostics of the three papers behind popcomp, as documented formulas.

Equation numbers refer to the papers in ``shared/papers``:

* **bu2020** — Bu, Gao, Zou, Veeravalli, *Information-theoretic understanding of population risk
  improvement with model compression* (AAAI 2020): Theorem 1 (eq. 10), eq. (12)/(28),
  Theorem 2 (eq. 13), Lemma 3 (eq. 17),
  Theorem 3 (eq. 19), Theorem 4 (eqs. 22-23), the Oracle compressor (eq. 25), Corollary 1 (eq. 26).
  All logarithms are natural: mutual informations and rates are in **nats**.
* **zhang2020** — Zhang, *Compression-based generalization bounds* (survey of Arora et al. 2018):
  Definitions 4.1-4.3 (norms, stable rank), Lemma 4.4 (SVD truncation), Lemma 4.5 (random
  projection with a helper string), Definitions 5.2-5.6 (noise sensitivity, cushions, activation
  contraction), the effective-parameter counts of Theorems 5.1 and 5.7 **without** their hidden
  constants and logarithmic factors.
* **suzuki2020** — Suzuki et al., *Spectral pruning* (IJCAI 2020): degrees of freedom N̂(λ),
  eq. (3) linking width and λ, the variance term δ₂ and bias proxy Σ√λ_ℓ of Theorem 2, and the
  Table 1 intrinsic-dimensionality comparison.

Everything here is plain torch (float64 where it matters) and works on any device.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

Number = Union[float, int]

__all__ = [
    # bu2020
    "theorem1_bound", "eq12_bound", "theorem2_bound", "lemma3_generalization_error", "sigma_ell_sq", "theorem3_bound",
    "theorem4_rate_upper", "theorem4_distortion_upper", "corollary1_bound", "oracle_alpha",
    "oracle_compress", "linreg_sample", "linreg_erm", "linreg_population_risk",
    "linreg_empirical_risk", "label_entropy",
    # zhang2020
    "spectral_norm", "frobenius_norm", "stable_rank", "layer_norms", "svd_truncate",
    "LowRankLinear", "low_rank_linear", "lemma45_eta", "lemma45_num_projections",
    "random_projection_compress", "noise_sensitivity", "noise_sensitivity_gaussian_matrix",
    "mlp_cushions", "effective_params_thm51", "effective_params_thm57", "margins",
    # suzuki2020
    "degrees_of_freedom", "lambda_for_width", "width_for_lambda", "suzuki_delta2",
    "suzuki_bias_proxy", "layer_covariances", "spectral_capacity", "intrinsic_dimensionality_table",
]


def _check_pos(name: str, v, strict: bool = True) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}") from None
    if not math.isfinite(f) or (f <= 0 if strict else f < 0):
        raise ValueError(f"{name} must be {'>' if strict else '>='} 0 and finite, got {v}")
    return f


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


def _as_t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


# =============================================================================================
# bu2020
# =============================================================================================

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
    r = _as_t(rate)
    if bool((r < 0).any()):
        raise ValueError("rate must be >= 0")
    return 2.0 * sigma_ell_sq(C, sigma_x_norm, noise_var) * torch.sqrt(r / n)


def theorem4_rate_upper(D, d: int, n: int, noise_var: float = 1.0):
    """bu2020 Theorem 4, eq. (22): R(D) ≤ d/2 · (ln(d σ'² / ((n − d − 1) D)))⁺, D ≥ 0 (nats)."""
    _check_linreg_dims(d, n)
    noise_var = _check_pos("noise_var", noise_var, strict=False)
    D = _as_t(D)
    if bool((D < 0).any()):
        raise ValueError("D must be >= 0")
    v = d * noise_var / (n - d - 1.0)
    return 0.5 * d * torch.clamp(torch.log(v / D), min=0.0)


def theorem4_distortion_upper(R, d: int, n: int, noise_var: float = 1.0):
    """bu2020 Theorem 4, eq. (23): D(R) ≤ d σ'² / (n − d − 1) · exp(−2R/d), R ≥ 0 (nats)."""
    _check_linreg_dims(d, n)
    noise_var = _check_pos("noise_var", noise_var, strict=False)
    R = _as_t(R)
    if bool((R < 0).any()):
        raise ValueError("R must be >= 0")
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
    D = _as_t(D)
    if bool((D < 0).any()):
        raise ValueError("D must be >= 0")
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


# =============================================================================================
# zhang2020
# =============================================================================================

def _mat(A) -> torch.Tensor:
    A = _as_t(A)
    if isinstance(A, nn.Parameter):
        A = A.detach()
    A = A.detach()
    if A.dim() > 2:  # conv kernels: (out, in·kh·kw)
        A = A.reshape(A.shape[0], -1)
    if A.dim() != 2:
        raise ValueError(f"expected a matrix (or a conv kernel), got shape {tuple(A.shape)}")
    return A


def spectral_norm(A) -> float:
    """zhang2020 Definition 4.2: ‖A‖₂ = σ₁ (largest singular value). Conv kernels are flattened
    to (out, in·kh·kw)."""
    return float(torch.linalg.matrix_norm(_mat(A).double(), ord=2))


def frobenius_norm(A) -> float:
    """zhang2020 Definition 4.1: ‖A‖_F = √(Σ σ_i²) = √tr(AᵀA)."""
    return float(torch.linalg.matrix_norm(_mat(A).double(), ord="fro"))


def stable_rank(A) -> float:
    """zhang2020 Definition 4.3: ‖A‖_F² / ‖A‖₂² ∈ [1, rank A] (0 for the zero matrix)."""
    s = torch.linalg.svdvals(_mat(A).double())
    if float(s[0]) == 0.0:
        return 0.0
    return float((s * s).sum() / (s[0] * s[0]))


def _weight_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def layer_norms(model: nn.Module) -> List[Dict[str, float]]:
    """Per Linear/Conv layer: spectral norm, Frobenius norm, stable rank, rank, parameters."""
    out = []
    for name, m in _weight_layers(model):
        A = _mat(m.weight).double()
        s = torch.linalg.svdvals(A)
        out.append({
            "layer": name, "shape": "x".join(map(str, m.weight.shape)),
            "spectral_norm": float(s[0]), "frobenius_norm": float(s.norm()),
            "stable_rank": float((s * s).sum() / (s[0] ** 2)) if float(s[0]) > 0 else 0.0,
            "rank": int((s > s[0] * max(A.shape) * torch.finfo(torch.float64).eps).sum()),
            "params": int(m.weight.numel()),
        })
    return out


def svd_truncate(A, delta: float) -> Tuple[torch.Tensor, int]:
    """zhang2020 Lemma 4.4: remove the singular values < δ‖A‖₂.

    Returns (Ã, rank Ã). Guarantees ‖Ã − A‖₂ ≤ δ‖A‖₂ and rank Ã ≤ ‖A‖_F² / (δ²‖A‖₂²).
    """
    if not (0 < float(delta)):
        raise ValueError(f"delta must be > 0, got {delta}")
    A = _mat(A)
    U, s, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    keep = s >= delta * s[0]
    r = int(keep.sum())
    At = (U[:, :r] * s[:r]) @ Vh[:r]
    return At.to(A.dtype), r


class LowRankLinear(nn.Module):
    """A Linear layer factorized as two smaller layers: x ↦ B(Vx) + b, V (r×in), B (out×r).

    Parameters r·(in + out) (+ out for the bias) instead of in·out.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def forward(self, x):
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def low_rank_linear(linear: nn.Linear, delta: Optional[float] = None,
                    rank: Optional[int] = None) -> LowRankLinear:
    """Lemma 4.4 compression of an ``nn.Linear``: a :class:`LowRankLinear` whose weight is the
    SVD truncation of ``linear.weight`` at threshold δ‖A‖₂ (or at a given rank)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    if (delta is None) == (rank is None):
        raise ValueError("give exactly one of delta= or rank=")
    W = linear.weight.detach()
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    if rank is None:
        if not float(delta) > 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        rank = int((s >= delta * s[0]).sum())
    if not 1 <= rank <= s.numel():
        raise ValueError(f"rank must be in [1, {s.numel()}], got {rank}")
    rank = max(1, int(rank))
    m = LowRankLinear(W.shape[1], W.shape[0], rank, bias=linear.bias is not None)
    m = m.to(device=W.device, dtype=W.dtype)
    with torch.no_grad():
        m.first.weight.copy_((s[:rank, None] * Vh[:rank]).to(W.dtype))
        m.second.weight.copy_(U[:, :rank].to(W.dtype))
        if linear.bias is not None:
            m.second.bias.copy_(linear.bias.detach())
    return m


def lemma45_eta(delta: float, m: int, n: int) -> float:
    """η = δ/(m n) of zhang2020 Lemma 4.5 (m pairs, U with n rows)."""
    return float(delta) / (int(m) * int(n))


def lemma45_num_projections(eps: float, eta: float) -> int:
    """k = ⌈8 log(1/η) / ε²⌉ random ±1 matrices (zhang2020 §4, step 1)."""
    if not (0 < eps <= 1) or not (0 < eta < 1):
        raise ValueError(f"need 0 < eps <= 1 and 0 < eta < 1, got eps={eps}, eta={eta}")
    return int(math.ceil(8.0 * math.log(1.0 / eta) / eps ** 2))


def random_projection_compress(A, eps: float, *, eta: Optional[float] = None,
                               delta: Optional[float] = None, m: Optional[int] = None,
                               n: Optional[int] = None, k: Optional[int] = None, seed: int = 0,
                               chunk: int = 64) -> Tuple[torch.Tensor, int]:
    """zhang2020 §4 projection algorithm behind Lemma 4.5, with the helper string = ``seed``.

    Draw k = ⌈8 log(1/η)/ε²⌉ matrices M_j with i.i.d. ±1 entries from a generator seeded by
    ``seed``, and return Â = (1/k) Σ_j ⟨A, M_j⟩ M_j and k. Give ``eta``, or ``delta`` with the
    number of pairs ``m`` and rows ``n`` (η = δ/(mn)), or ``k`` directly. Lemma 4.5: with
    probability ≥ 1 − δ over the helper string, ‖U(Â − A)x‖ ≤ ε‖U‖_F‖A‖_F‖x‖ for all m pairs.
    The compressed form is (seed, the k scalars ⟨A, M_j⟩).
    """
    A = _mat(A).double()
    if k is None:
        if eta is None:
            if delta is None or m is None or n is None:
                raise ValueError("give eta=, or delta= with m= and n=, or k=")
            eta = lemma45_eta(delta, m, n)
        k = lemma45_num_projections(eps, eta)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    out = torch.zeros_like(A)
    done = 0
    while done < k:
        c = min(chunk, k - done)
        M = (torch.randint(0, 2, (c, *A.shape), generator=g, dtype=torch.int8).double() * 2 - 1)
        M = M.to(A.device)
        coef = (M * A).sum(dim=(1, 2))
        out += (coef[:, None, None] * M).sum(0)
        done += c
    return out / k, int(k)


def noise_sensitivity(fn, x: torch.Tensor, samples: int = 64, seed: int = 0) -> torch.Tensor:
    """zhang2020 Definition 5.2 with 𝒩 = N(0, I), Monte Carlo over ``samples`` draws:

        ψ(M, x) = E_η ‖M(x + η‖x‖) − M(x)‖² / ‖M(x)‖²,   per row of x (batch, features).

    The maximum over a set S is ψ_{𝒩,S}(M) = ψ.max().
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        fx = fn(x)
        nx = x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        acc = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for _ in range(samples):
            eta = torch.randn(x.shape, generator=g).to(x)
            d = fn(x + eta * nx) - fx
            acc += (d.flatten(1).double() ** 2).sum(1)
        return acc / samples / (fx.flatten(1).double() ** 2).sum(1)


def noise_sensitivity_gaussian_matrix(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """zhang2020 Proposition 5.3: for a linear map, ψ(M, x) = ‖M‖_F² ‖x‖² / ‖Mx‖² (rows of x)."""
    M = _mat(M).double()
    x = x.double()
    return (M.norm() ** 2) * (x * x).sum(-1) / ((x @ M.T) ** 2).sum(-1)


def _mlp_layers(model: nn.Module) -> List[nn.Linear]:
    mods = [m for m in model.modules() if not list(m.children())]
    lin = []
    for m in mods:
        if isinstance(m, nn.Linear):
            lin.append(m)
        elif isinstance(m, (nn.ReLU, nn.Dropout, nn.Flatten, nn.Identity)):
            continue
        else:
            raise ValueError(
                f"the cushion diagnostics handle MLPs of Linear/ReLU/Dropout/Flatten only; "
                f"found {type(m).__name__}"
            )
    if not lin:
        raise ValueError("model has no nn.Linear layer")
    return lin


def _preacts(model: nn.Module, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Inputs φ(x^{i−1}) and outputs x^i of every Linear layer (eval mode)."""
    lin = _mlp_layers(model)
    ins, outs = [], []
    def hook(mod, inp, out):
        ins.append(inp[0].detach().flatten(1))
        outs.append(out.detach())

    hooks = [m.register_forward_hook(hook) for m in lin]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return ins, outs


def mlp_cushions(model: nn.Module, x: torch.Tensor, reduce: str = "max") -> Dict[str, object]:
    """Data-dependent quantities of zhang2020 §5 for a ReLU MLP on inputs ``x``.

    * layer cushion μ_i (Definition 5.4): ``reduce`` over x of ‖A^i φ(x^{i−1})‖ / (‖A^i‖_F ‖φ(x^{i−1})‖)
      (the survey writes max; Arora et al. 2018 take the worst case, ``reduce="min"``);
    * interlayer cushion μ_{i,j} (Definition 5.5) of the Jacobian J^{i,j} = A^j D_{j−1} ⋯ A^{i+1} D_i
      of x^i ↦ x^j (D = ReLU derivative; biases do not enter a Jacobian), and the minimal
      interlayer cushion μ_{i→} = min_{i≤j≤d} μ_{i,j}. For j = i the definition gives
      ‖x‖/(‖I‖_F‖x‖) = 1/√h_i (the survey prints √h, a slip), so μ_{i→} ≤ 1/√h_i as in Arora et al.;
    * activation contraction (Definition 5.6) c = min_{x, i<d} ‖φ(x^i)‖/‖x^i‖ as written, and
      ``c_arora`` = 1/c ≥ 1, the convention of Arora et al. used by Theorem 5.7;
    * noise sensitivity of each layer at its input, 1/μ_i² (Proposition 5.3) per sample, max.

    Weights are biasless matrices A^i; layers are the model's nn.Linear modules in order, each
    followed by ReLU except the last.
    """
    if reduce not in ("max", "min", "mean"):
        raise ValueError(f"reduce must be 'max', 'min' or 'mean', got {reduce!r}")
    red = {"max": torch.max, "min": torch.min, "mean": torch.mean}[reduce]
    lin = _mlp_layers(model)
    ins, outs = _preacts(model, x)
    d = len(lin)
    A = [m.weight.detach().double() for m in lin]
    layer_cushion, noise_sens = [], []
    for i in range(d):
        phi = ins[i].double()
        num = (phi @ A[i].T).norm(dim=1)
        den = A[i].norm() * phi.norm(dim=1)
        ok = den > 0
        r = num[ok] / den[ok]
        layer_cushion.append(float(red(r)))
        noise_sens.append(float((1.0 / r ** 2).max()))
    pre = [o.double().flatten(1) for o in outs]
    inter = [[float("nan")] * d for _ in range(d)]
    min_inter = []
    for i in range(d):
        h_i = pre[i].shape[1]
        inter[i][i] = 1.0 / math.sqrt(h_i)
        xi = pre[i]
        J = None  # (N, h_j, h_i)
        for j in range(i + 1, d):
            Dm = (pre[j - 1] > 0).double()  # ReLU derivative at x^{j-1}
            step = A[j].unsqueeze(0) * Dm.unsqueeze(1)  # A^j D_{j-1}: (N, h_j, h_{j-1})
            J = step if J is None else step @ J
            Jx = (J @ xi.unsqueeze(-1)).squeeze(-1).norm(dim=1)
            den = J.flatten(1).norm(dim=1) * xi.norm(dim=1)
            ok = den > 0
            inter[i][j] = float(red(Jx[ok] / den[ok])) if bool(ok.any()) else float("nan")
        vals = [v for v in inter[i][i:] if not math.isnan(v)]
        min_inter.append(min(vals))
    ratios = []
    for i in range(d - 1):
        nz = pre[i].norm(dim=1) > 0
        ratios.append((torch.relu(pre[i]).norm(dim=1)[nz] / pre[i].norm(dim=1)[nz]).min())
    c = float(torch.stack(ratios).min()) if ratios else 1.0
    return {
        "layer_cushion": layer_cushion, "interlayer_cushion": inter,
        "min_interlayer_cushion": min_inter, "activation_contraction": c,
        "c_arora": (1.0 / c) if c > 0 else float("inf"), "noise_sensitivity": noise_sens,
        "max_input_norm": float(x.flatten(1).double().norm(dim=1).max()),
        "max_output_norm": float(pre[-1].norm(dim=1).max()),
    }


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """f(x)[y] − max_{j≠y} f(x)[j] per sample (zhang2020 Definition 2.1's margin)."""
    lg = logits.detach().double()
    true = lg.gather(1, targets.view(-1, 1)).squeeze(1)
    other = lg.scatter(1, targets.view(-1, 1), float("-inf")).max(1).values
    return true - other


def _default_gamma(model, x, y):
    with torch.no_grad():
        was = model.training
        model.eval()
        m = margins(model(x), y)
        model.train(was)
    pos = m[m > 0]
    return float(torch.quantile(pos, 0.1)) if pos.numel() else float(m.abs().median())


def effective_params_thm51(model: nn.Module, x: torch.Tensor, gamma: float) -> float:
    """zhang2020 Theorem 5.1 (Neyshabur et al.), the quantity under the square root times m,
    **without** the Õ's constants and logs:

        h d² max_x ‖x‖² ∏_i ‖A^i‖₂² Σ_i ‖A^i‖_F²/‖A^i‖₂² / γ²

    (the proof gives max‖x‖²; the survey's display drops the square). h = the largest width.
    """
    lin = _mlp_layers(model)
    d = len(lin)
    h = max(max(m.weight.shape) for m in lin)
    prod = 1.0
    srank = 0.0
    for m in lin:
        s = torch.linalg.svdvals(m.weight.detach().double())
        prod *= float(s[0]) ** 2
        srank += float((s * s).sum() / s[0] ** 2)
    xmax = float(x.flatten(1).double().norm(dim=1).max())
    return h * d * d * xmax ** 2 * prod * srank / gamma ** 2


def effective_params_thm57(model: nn.Module, x: torch.Tensor, gamma: float,
                           cushions: Optional[Dict[str, object]] = None) -> float:
    """zhang2020 Theorem 5.7 (Arora et al. 2018), without constants and logs:

        c² d² max_x ‖f(x)‖² Σ_i 1/(μ_i² μ_{i→}²) / γ²,

    with c = ``c_arora`` ≥ 1, μ_i the layer cushion (worst case over the data, ``reduce="min"``)
    and μ_{i→} the minimal interlayer cushion.
    """
    cu = cushions if cushions is not None else mlp_cushions(model, x, reduce="min")
    d = len(cu["layer_cushion"])
    s = sum(1.0 / (mu ** 2 * mi ** 2) for mu, mi in zip(cu["layer_cushion"], cu["min_interlayer_cushion"]))
    return cu["c_arora"] ** 2 * d * d * cu["max_output_norm"] ** 2 * s / gamma ** 2


# =============================================================================================
# suzuki2020
# =============================================================================================

def _eigs(cov_or_eigs) -> torch.Tensor:
    t = _as_t(cov_or_eigs).double()
    if not bool(torch.isfinite(t).all()):  # NaN/Inf would stall the bisections of eq. (3)
        raise ValueError("cov_or_eigs contains NaN or Inf")
    if t.dim() == 2:
        t = torch.linalg.eigvalsh(0.5 * (t + t.T))
    return torch.clamp(t, min=0.0)


def degrees_of_freedom(cov_or_eigs, lam):
    """suzuki2020 §4.1: N̂(λ) = Tr[Σ̂(Σ̂ + λI)⁻¹] = Σ_j μ̂_j/(μ̂_j + λ), from Σ̂ or its eigenvalues.
    Elementwise in λ (> 0)."""
    mu = _eigs(cov_or_eigs)
    lam = _as_t(lam).double().to(mu.device)
    if bool((lam <= 0).any()):
        raise ValueError("lambda must be > 0")
    return (mu / (mu + lam.unsqueeze(-1))).sum(-1)


def width_for_lambda(cov_or_eigs, lam: float) -> int:
    """The smallest width m♯ with m♯ ≥ 5 N̂(λ) log(80 N̂(λ)) (suzuki2020 eq. 3 read backwards),
    clipped to [1, m]."""
    mu = _eigs(cov_or_eigs)
    N = float(degrees_of_freedom(mu, lam))
    w = 5.0 * N * math.log(max(80.0 * N, 1.0)) if N > 0 else 1.0
    return int(min(max(1, math.ceil(w)), mu.numel()))


def lambda_for_width(cov_or_eigs, width: int, iters: int = 200) -> float:
    """suzuki2020 eq. (3): λ_ℓ = inf{λ ≥ 0 | m♯ ≥ 5 N̂(λ) log(80 N̂(λ))}, by bisection in log λ
    (N̂ decreases in λ). Returns 0.0 when the condition already holds as λ → 0."""
    mu = _eigs(cov_or_eigs)
    width = int(width)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")

    def ok(lam):
        N = float(degrees_of_freedom(mu, lam))
        return N <= 0 or width >= 5.0 * N * math.log(max(80.0 * N, 1e-300))

    top = float(mu.max()) if mu.numel() else 1.0
    if top <= 0:
        return 0.0
    lo, hi = top * 1e-14, top * 1e8
    if ok(lo):
        return 0.0
    while not ok(hi):
        hi *= 1e4
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    return hi


def suzuki_delta2(widths: Sequence[int], n: int, R: float, R_b: float, D_x: float,
                  M: float = float("inf"), c_hat: float = 1.0) -> float:
    """suzuki2020 Theorem 2's variance term δ₂ for widths (m♯_1, …, m♯_{L+1}):

        δ₂² = (1/n) Σ_{ℓ=1}^{L} m♯_ℓ m♯_{ℓ+1} log₊(1 + 4Ĝ max{R̄, R̄_b}/R̂_∞),
        R̂_∞ = min{R̄^L D_x + Σ_ℓ R̄^{L−ℓ} R̄_b, M},  Ĝ = L R̄^{L−1} D_x + Σ_ℓ R̄^{L−ℓ},
        R̄ = √ĉ R, R̄_b = √ĉ R_b, log₊(x) = max{1, log x}.

    R bounds the layers' operator norms, R_b their bias norms, D_x the input norm; ĉ (the
    constant of Theorem 1) defaults to 1, so δ₂ is stated up to that constant.
    """
    w = [int(v) for v in widths]
    if len(w) < 2 or min(w) < 1:
        raise ValueError(f"widths must list >= 2 positive layer widths, got {widths}")
    L = len(w) - 1
    Rb, Rbb = math.sqrt(c_hat) * R, math.sqrt(c_hat) * R_b
    Rinf = min(Rb ** L * D_x + sum(Rb ** (L - l) * Rbb for l in range(1, L + 1)), M)
    G = L * Rb ** (L - 1) * D_x + sum(Rb ** (L - l) for l in range(1, L + 1))
    arg = 1.0 + 4.0 * G * max(Rb, Rbb) / Rinf if Rinf > 0 else float("inf")
    logp = max(1.0, math.log(arg))
    return math.sqrt(sum(w[l] * w[l + 1] for l in range(L)) / n * logp)


def suzuki_bias_proxy(lams: Iterable[float]) -> float:
    """The bias proxy Σ_{ℓ≥2} √λ_ℓ of suzuki2020 Theorem 2 (the δ₁ of eq. 4 without its
    R̄/ζ factors); pass the λ_ℓ of the pruned (hidden) layers."""
    return float(sum(math.sqrt(max(0.0, float(l))) for l in lams))


def layer_covariances(model: nn.Module, data, max_batches: Optional[int] = None,
                      device=None) -> List[Dict[str, object]]:
    """Non-centered covariance Σ̂ = (1/n) Σ φ(x_i)φ(x_i)ᵀ of the *input* of every Linear/Conv
    layer (suzuki2020 §2.1; for Conv the covariance is over channels with every spatial
    position a sample). ``data`` is an iterable of (x, y) batches or a tensor of inputs."""
    layers = _weight_layers(model)
    if not layers:
        raise ValueError("model has no Linear/Conv layer")
    acc: Dict[str, torch.Tensor] = {}
    cnt: Dict[str, int] = {}
    pts: Dict[str, int] = {}
    mx: Dict[str, float] = {}

    def hook(name):
        def f(mod, inp, out):
            a = inp[0].detach().double()
            pts[name] = pts.get(name, 0) + a.shape[0]
            mx[name] = max(mx.get(name, 0.0), float(a.flatten(1).norm(dim=1).max()))
            if isinstance(mod, nn.Conv2d):
                a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
            elif isinstance(mod, nn.Conv1d):
                a = a.permute(0, 2, 1).reshape(-1, a.shape[1])
            else:
                a = a.reshape(-1, a.shape[-1])
            acc[name] = acc.get(name, 0) + a.T @ a
            cnt[name] = cnt.get(name, 0) + a.shape[0]
        return f

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = [(data, None)] if isinstance(data, torch.Tensor) else data
            for b, batch in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                xb = batch[0] if isinstance(batch, (tuple, list)) else batch
                if device is not None:
                    xb = xb.to(device)
                model(xb)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not cnt:
        raise ValueError("data is empty")
    return [{"layer": n, "module": m, "cov": acc[n] / cnt[n], "n": cnt[n], "n_inputs": pts[n],
             "max_input_norm": mx[n]} for n, m in layers]


def spectral_capacity(model: nn.Module, data, widths: Optional[Sequence[int]] = None,
                      ratio: Optional[float] = None, n: Optional[int] = None,
                      lam_factor: Optional[float] = None) -> Dict[str, object]:
    """suzuki2020 Theorem 2 for an MLP/CNN and chosen widths of its hidden layers.

    The hidden widths (the inputs of layers 2..L) are ``widths`` or ``ratio``·original, or chosen
    from λ_ℓ = ``lam_factor``·Tr Σ̂_ℓ. Returns per layer the eigenvalues, λ_ℓ (eq. 3), N̂_ℓ(λ_ℓ),
    and the totals: the bias proxy Σ√λ_ℓ, δ₂ (with R = max ‖A‖₂, R_b = max ‖b‖, D_x = max ‖x‖,
    ĉ = 1), and the VC-like term √(Σ m_ℓ m_{ℓ+1}/n) of the uncompressed network.
    """
    covs = layer_covariances(model, data)
    hidden = covs[1:]
    if widths is not None:
        widths = [int(w) for w in widths]
        if len(widths) != len(hidden):
            raise ValueError(f"widths must give {len(hidden)} hidden widths, got {len(widths)}")
    rows = []
    lams, new_w = [], []
    for i, c in enumerate(hidden):
        mu = _eigs(c["cov"])
        m = mu.numel()
        if widths is not None:
            w = widths[i]
            lam = lambda_for_width(mu, w)
        elif ratio is not None:
            w = max(1, int(round(ratio * m)))
            lam = lambda_for_width(mu, w)
        else:
            lam = (lam_factor if lam_factor is not None else 1e-6) * float(mu.sum())
            w = width_for_lambda(mu, lam)
        lams.append(lam)
        new_w.append(w)
        rows.append({"layer": c["layer"], "width": m, "width_pruned": w, "lambda": lam,
                     "dof": float(degrees_of_freedom(mu, lam)) if lam > 0 else float((mu > 0).sum()),
                     "eigs": mu.flip(0)})
    ws = [l["module"].weight for l in covs]
    R = max(spectral_norm(w) for w in ws)
    R_b = max(float(l["module"].bias.detach().norm()) if l["module"].bias is not None else 0.0
              for l in covs)
    D_x = covs[0]["max_input_norm"]
    n = int(n if n is not None else covs[0]["n_inputs"])
    first_in = covs[0]["cov"].shape[0]
    last_out = covs[-1]["module"].weight.shape[0]
    orig = [first_in] + [r["width"] for r in rows] + [last_out]
    pruned = [first_in] + new_w + [last_out]
    return {
        "layers": rows, "bias_proxy": suzuki_bias_proxy(lams),
        "delta2": suzuki_delta2(pruned, n, R, R_b, D_x),
        "delta2_original": suzuki_delta2(orig, n, R, R_b, D_x),
        "vc_term_original": math.sqrt(sum(orig[i] * orig[i + 1] for i in range(len(orig) - 1)) / n),
        "widths_original": orig, "widths_pruned": pruned, "R": R, "R_b": R_b, "D_x": D_x, "n": n,
    }


def intrinsic_dimensionality_table(model: nn.Module, x: torch.Tensor,
                                   y: Optional[torch.Tensor] = None, lam_factor: float = 1e-3,
                                   gamma: Optional[float] = None) -> List[Dict[str, object]]:
    """suzuki2020 Table 1 for a given model and data: per Linear/Conv layer ℓ

    * ``original``: its parameter count m_ℓ m_{ℓ+1} k²;
    * ``spec_prun``: N̂_ℓ(λ_ℓ) N̂_{ℓ+1}(λ_{ℓ+1}) k² with λ_ℓ = ``lam_factor``·Tr Σ̂_ℓ (Σ̂ of the
      layer's input; for the last layer N̂_{ℓ+1} is its output width);
    * ``arora``: the layer's term of Theorem 5.7, c² d² max‖f(x)‖² / (γ² μ_ℓ² μ_{ℓ→}²) (MLPs
      only; NaN for conv layers, whose cushions are not computed here).

    Depth and log factors are omitted in both, as in the paper's footnote 4.
    """
    covs = layer_covariances(model, x)
    dofs = []
    for c in covs:
        mu = _eigs(c["cov"])
        dofs.append(float(degrees_of_freedom(mu, lam_factor * float(mu.sum()))) if float(mu.sum()) > 0 else 0.0)
    arora = [float("nan")] * len(covs)
    try:
        cu = mlp_cushions(model, x, reduce="min")
        if gamma is None:
            gamma = _default_gamma(model, x, y) if y is not None else 1.0
        d = len(cu["layer_cushion"])
        pref = cu["c_arora"] ** 2 * d * d * cu["max_output_norm"] ** 2 / gamma ** 2
        arora = [pref / (mu ** 2 * mi ** 2) for mu, mi in
                 zip(cu["layer_cushion"], cu["min_interlayer_cushion"])]
    except ValueError:
        pass
    rows = []
    for i, c in enumerate(covs):
        mod = c["module"]
        k2 = int(mod.weight[0, 0].numel())
        nxt = dofs[i + 1] if i + 1 < len(covs) else float(mod.weight.shape[0])
        rows.append({"layer": c["layer"], "original": int(mod.weight.numel()),
                     "arora": arora[i], "spec_prun": dofs[i] * nxt * k2,
                     "dof_in": dofs[i]})
    return rows
