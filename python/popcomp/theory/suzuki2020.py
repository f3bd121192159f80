"""Suzuki et al., *Spectral pruning* (IJCAI 2020): the theory's quantities for a model — the layer covariances, δ₂ and the bias proxy of Theorem 2, the spectral capacity and the Table 1 intrinsic dimensionality — on :mod:`popcomp.spectral`'s degrees of freedom and eq. (3).

N̂(λ) and the width ↔ λ rule of eq. (3) have one implementation, in
:mod:`popcomp.spectral.quantities`; :func:`degrees_of_freedom`, :func:`width_for_lambda` and
:func:`lambda_for_width` here are documented aliases of it that take a covariance or its
eigenvalues as ``cov_or_eigs``. The covariances are accumulated by the covariance op
(:class:`popcomp.CovarianceAccumulator`).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .._model import call_model, eval_mode, input_of, to_device
from ..spectral import quantities as Q
from ..spectral.covariance import CovarianceAccumulator
from ._common import as_t as _as_t, weight_layers
from .zhang2020 import _default_gamma, mlp_cushions, spectral_norm

__all__ = [
    "degrees_of_freedom", "lambda_for_width", "width_for_lambda", "suzuki_delta2",
    "suzuki_bias_proxy", "suzuki_norm_bounds", "layer_covariances", "spectral_capacity",
    "intrinsic_dimensionality_table",
]


def _eigs(cov_or_eigs) -> torch.Tensor:
    return Q.eigenvalues(_as_t(cov_or_eigs), name="cov_or_eigs")


def degrees_of_freedom(cov_or_eigs, lam):
    """suzuki2020 §4.1: N̂(λ) = Tr[Σ̂(Σ̂ + λI)⁻¹] = Σ_j μ̂_j/(μ̂_j + λ), from Σ̂ or its eigenvalues;
    elementwise in λ >= 0 (N̂(0) = rank Σ̂, the limit λ → 0+ that eq. (3)'s infimum over
    λ >= 0 evaluates). Alias of :func:`popcomp.spectral.degrees_of_freedom` (a float for a
    number λ, a tensor for a tensor of λ's)."""
    return Q.degrees_of_freedom(_eigs(cov_or_eigs), lam)


def width_for_lambda(cov_or_eigs, lam: float) -> int:
    """The smallest width m♯ with m♯ ≥ 5 N̂(λ) log(80 N̂(λ)) (suzuki2020 eq. 3 read backwards),
    clipped to [1, m]. Alias of :func:`popcomp.spectral.width_from_lambda` with the paper's
    constants."""
    return Q.width_from_lambda(_eigs(cov_or_eigs), lam)


def lambda_for_width(cov_or_eigs, width: int, iters: int = 200) -> float:
    """suzuki2020 eq. (3): λ_ℓ = inf{λ ≥ 0 | m♯ ≥ 5 N̂(λ) log(80 N̂(λ))}, by bisection (N̂
    decreases in λ) to a relative tolerance of 1e-10, at most ``iters`` steps. Returns 0.0 when the condition holds at λ = 0.
    Alias of :func:`popcomp.spectral.lambda_from_width` with the paper's constants."""
    return Q.lambda_from_width(_eigs(cov_or_eigs), width, max_iter=iters)


def suzuki_delta2(widths: Sequence[int], n: int, R: float, R_b: float, D_x: float,
                  M: float = float("inf"), c_hat: float = 1.0) -> float:
    """suzuki2020 Theorem 2's variance term δ₂ for widths (m♯_1, …, m♯_{L+1}):

        δ₂² = (1/n) Σ_{ℓ=1}^{L} m♯_ℓ m♯_{ℓ+1} log₊(1 + 4Ĝ max{R̄, R̄_b}/R̂_∞),
        R̂_∞ = min{R̄^L D_x + Σ_ℓ R̄^{L−ℓ} R̄_b, M},  Ĝ = L R̄^{L−1} D_x + Σ_ℓ R̄^{L−ℓ},
        R̄ = √ĉ R, R̄_b = √ĉ R_b, log₊(x) = max{1, log x}.

    R and R_b are the norm bounds of the paper's model class (§4: max_j ‖W_{j,:}‖ ≤ R/√m_{ℓ+1},
    ‖b‖_∞ ≤ R_b/√m_{ℓ+1}; :func:`suzuki_norm_bounds` measures them), D_x bounds the input norm;
    ĉ (the constant of Theorem 1) defaults to 1, so δ₂ is stated up to that constant.
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


def suzuki_norm_bounds(model_or_layers, definition: str = "paper") -> Dict[str, float]:
    """The smallest R, R_b for which the network lies in suzuki2020's norm-constrained class.

    ``"paper"`` (§4's definition of 𝓕): R = max_ℓ √m_{ℓ+1} max_j ‖W⁽ℓ⁾_{j,:}‖ and
    R_b = max_ℓ √m_{ℓ+1} ‖b⁽ℓ⁾‖_∞, with m_{ℓ+1} the layer's output width and W_{j,:} the weights
    of output unit j (for a convolution: its flattened filter). ``"operator"``: R = the largest
    spectral norm ‖W⁽ℓ⁾‖₂ and R_b = the largest ‖b⁽ℓ⁾‖₂ (this package's earlier choice, kept
    as an option). ``model_or_layers``: a model (its Linear/Conv layers) or a list of layers.
    Returns ``{"R", "R_b"}``.
    """
    layers = ([m for _, m in weight_layers(model_or_layers)] if isinstance(model_or_layers, nn.Module)
              else list(model_or_layers))
    if not layers:
        raise ValueError("model_or_layers has no Linear/Conv layer")
    if definition not in ("paper", "operator"):
        raise ValueError(f"definition must be 'paper' or 'operator', got {definition!r}")
    R = R_b = 0.0
    for m in layers:
        W = m.weight.detach().to(torch.float64)
        b = m.bias.detach().to(torch.float64) if m.bias is not None else None
        if definition == "paper":
            s = math.sqrt(W.shape[0])
            R = max(R, s * float(W.flatten(1).norm(dim=1).max()))
            if b is not None and b.numel():
                R_b = max(R_b, s * float(b.abs().max()))
        else:
            R = max(R, spectral_norm(W))
            if b is not None:
                R_b = max(R_b, float(b.norm()))
    return {"R": R, "R_b": R_b}


def suzuki_bias_proxy(lams: Iterable[float]) -> float:
    """The bias proxy Σ_{ℓ≥2} √λ_ℓ of suzuki2020 Theorem 2 (the δ₁ of eq. 4 without its
    R̄/ζ factors); pass the λ_ℓ of the pruned (hidden) layers."""
    return float(sum(math.sqrt(max(0.0, float(l))) for l in lams))


def layer_covariances(model: nn.Module, data, max_batches: Optional[int] = None,
                      device=None) -> List[Dict[str, object]]:
    """Non-centered covariance Σ̂ = (1/n) Σ φ(x_i)φ(x_i)ᵀ (float64) of the *input* of every
    Linear/Conv layer (suzuki2020 §2.1; for Conv the covariance is over channels with every
    spatial position a sample, for a Linear over its last axis), accumulated by the covariance
    op in eval mode (every module's mode restored). ``data`` is a tensor of inputs or an
    iterable of batches (``(x, y)`` pairs, inputs, or dicts with an ``input``/``x`` entry).
    Per layer: ``cov``, ``n`` (samples of Σ̂), ``n_inputs`` (inputs seen) and
    ``max_input_norm`` (the largest ‖input‖ over the inputs). Each rank's own data (no
    all-reduce)."""
    layers = weight_layers(model)
    if not layers:
        raise ValueError("model has no Linear/Conv layer")
    accs = {n: CovarianceAccumulator(dtype=torch.float64, channel_dim=-1 if isinstance(m, nn.Linear) else 1)
            for n, m in layers}
    pts: Dict[str, int] = {}
    mx: Dict[str, float] = {}

    def hook(name):
        def pre(mod, args):
            a = args[0].detach()
            pts[name] = pts.get(name, 0) + a.shape[0]
            if a.numel():
                mx[name] = max(mx.get(name, 0.0), float(a.flatten(1).norm(dim=1, dtype=torch.float64).max()))
            accs[name].update(a)
        return pre

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    dev = None if device is None else torch.device(device)
    try:
        with torch.no_grad(), eval_mode(model):
            for b, batch in enumerate([data] if isinstance(data, torch.Tensor) else data):
                if max_batches is not None and b >= max_batches:
                    break
                call_model(model, to_device(input_of(batch), dev))
    finally:
        for h in hooks:
            h.remove()
    if not pts:
        raise ValueError("data is empty")
    out = []
    for n, m in layers:
        acc = accs[n]
        if n not in pts:
            raise ValueError(f"layer '{n}' received no input when the model ran on data")
        out.append({"layer": n, "module": m, "cov": acc.covariance(all_reduce=False), "n": int(acc.count),
                    "n_inputs": pts[n], "max_input_norm": mx.get(n, 0.0)})
    return out


def spectral_capacity(model: nn.Module, data, widths: Optional[Sequence[int]] = None,
                      ratio: Optional[float] = None, n: Optional[int] = None,
                      lam_factor: Optional[float] = None, norms: str = "paper") -> Dict[str, object]:
    """suzuki2020 Theorem 2 for an MLP/CNN and chosen widths of its hidden layers.

    The hidden widths (the inputs of layers 2..L) are ``widths`` or ``ratio``·original, or chosen
    from λ_ℓ = ``lam_factor``·Tr Σ̂_ℓ (default 1e-6) by eq. (3). Returns per layer the eigenvalues,
    λ_ℓ (eq. 3), N̂_ℓ(λ_ℓ), and the totals: the bias proxy Σ√λ_ℓ, δ₂ (with R, R_b of
    :func:`suzuki_norm_bounds` by the definition ``norms``, "paper" by default, D_x = max ‖x‖,
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
        mu = Q.eigenvalues(c["cov"])
        m = mu.numel()
        if widths is not None or ratio is not None:
            w = widths[i] if widths is not None else max(1, int(round(ratio * m)))
            lam = Q.lambda_from_width(mu, w)
        else:
            lam = Q.default_lambda(mu, lam_factor if lam_factor is not None else Q.DEFAULT_LAMBDA_REL)
            w = Q.width_from_lambda(mu, lam)
        lams.append(lam)
        new_w.append(w)
        rows.append({"layer": c["layer"], "width": m, "width_pruned": w, "lambda": lam,
                     "dof": Q.degrees_of_freedom(mu, lam), "eigs": mu.flip(0)})
    nb = suzuki_norm_bounds([l["module"] for l in covs], norms)
    R, R_b = nb["R"], nb["R_b"]
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
        "widths_original": orig, "widths_pruned": pruned, "R": R, "R_b": R_b, "norms": norms,
        "D_x": D_x, "n": n,
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
        mu = Q.eigenvalues(c["cov"])
        dofs.append(Q.degrees_of_freedom(mu, Q.default_lambda(mu, lam_factor)))
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
