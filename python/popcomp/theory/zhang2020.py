"""Zhang, *Compression-based generalization bounds* (survey of Arora et al. 2018): norms and stable rank, SVD truncation, random projection, noise sensitivity, cushions and the effective-parameter counts.

Definitions 4.1-4.3 (norms, stable rank), Lemma 4.4 (SVD truncation), Lemma 4.5 (random
projection with a helper string), Definitions 5.2-5.6 (noise sensitivity, cushions, activation
contraction), the effective-parameter counts of Theorems 5.1 and 5.7 **without** their hidden
constants and logarithmic factors. Plain torch (float64 where it matters), any device.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .._model import eval_mode, is_layer, own_forward
from ._common import as_t as _as_t, weight_layers

__all__ = [
    "spectral_norm", "frobenius_norm", "stable_rank", "layer_norms", "svd_truncate",
    "LowRankLinear", "low_rank_linear", "lemma45_eta", "lemma45_num_projections",
    "random_projection_compress", "noise_sensitivity", "noise_sensitivity_gaussian_matrix",
    "mlp_cushions", "effective_params_thm51", "effective_params_thm57", "margins",
]


def _mat(A) -> torch.Tensor:
    A = _as_t(A).detach()
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


def _stable_rank_of(s: torch.Tensor) -> float:
    """Σ σ_i² / σ_1² of the singular values ``s`` (descending); 0 when σ_1 = 0."""
    return float((s * s).sum() / (s[0] * s[0])) if float(s[0]) > 0 else 0.0


def stable_rank(A) -> float:
    """zhang2020 Definition 4.3: ‖A‖_F² / ‖A‖₂² ∈ [1, rank A] (0 for the zero matrix)."""
    return _stable_rank_of(torch.linalg.svdvals(_mat(A).double()))


def layer_norms(model: nn.Module) -> List[Dict[str, float]]:
    """Per Linear/Conv layer: spectral norm, Frobenius norm, stable rank, rank, parameters."""
    out = []
    for name, m in weight_layers(model):
        A = _mat(m.weight).double()
        s = torch.linalg.svdvals(A)
        out.append({
            "layer": name, "shape": "x".join(map(str, m.weight.shape)),
            "spectral_norm": float(s[0]), "frobenius_norm": float(s.norm()),
            "stable_rank": _stable_rank_of(s),
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
        if is_layer(m, (nn.Linear,)):
            lin.append(m)
        elif own_forward(m, (nn.ReLU, nn.Dropout, nn.Flatten, nn.Identity)):
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
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
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
    with torch.no_grad(), eval_mode(model):
        m = margins(model(x), y)
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
        srank += _stable_rank_of(s)
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
