"""Spectral pruning of whole networks (Suzuki et al. 2020, sec. 2.1, 3.1): :func:`spectral_prune`, which composes the covariances, quantities, greedy selection, reconstruction and site rewrites of this package, and its report.

For a layer with input activations φ (m units; for convolutions: channels, every spatial
position a sample) and the non-centered covariance Σ = E[φφᵀ], the units J are chosen by
:func:`~popcomp.spectral.greedy.greedy_select` and the next layer reads them through
``Â_J = Σ_FJ (Σ_JJ + I_τ)⁻¹`` (:func:`~popcomp.spectral.reconstruct.reconstruction`).
Paper defaults (every one overridable): ``λ = 1e-6 Tr Σ``, ``τ = m♯ λ τ̃`` (leverage scores τ̃),
``θ = 0.5`` and ``Z`` from the next layer's weights (rows of the kept next units scaled by
``√(m q_j) / max_j' ‖W_j'‖``, ``q`` proportional to the inverse leverage scores there).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import _validate as V
from .._model import batch_size, eval_mode, get_submodule, input_of, is_layer, progress as _progress
from .covariance import CovarianceAccumulator
from .greedy import check_tau, check_theta, greedy_select
from .quantities import (
    DEFAULT_LAMBDA_REL, check_lambda, default_lambda, degrees_of_freedom, eigh, leverage_constraint,
    leverage_from_eigh, paper_tau, width_from_lambda,
)
from .reconstruct import output_matrix, reconstruction
from .sites import (
    Site, consumer_weight, rewrite_site, run_batch, run_hooked, structural_sites, units_on_dim1,
    unsupported,
)

__all__ = ["spectral_prune", "PruneReport", "LayerReport", "DEFAULT_THETA"]

DEFAULT_THETA = 0.5  # the paper's θ (sec. 5)

Forward = Optional[Callable[[nn.Module, Any], Any]]


@dataclasses.dataclass
class LayerReport:
    name: str
    width_before: int
    width_after: int
    lam: float
    dof: float
    indices: torch.Tensor
    objective: float
    initial_objective: float
    # Theorem 1's constraint on the chosen units J: Σ_{j∈J} τ̃_j⁻¹ <= (5/3) m m♯ (τ̃: leverage
    # scores at λ); checked, not enforced: a violation is reported here and warned about
    leverage_inv_sum: float = float("nan")
    leverage_limit: float = float("nan")

    @property
    def leverage_ok(self) -> bool:
        """Whether the selection satisfies Theorem 1's leverage constraint."""
        return bool(self.leverage_inv_sum <= self.leverage_limit)


@dataclasses.dataclass
class PruneReport:
    """Result summary of :func:`spectral_prune`.

    widths_before / widths_after: units of every pruned layer (by producing-layer name).
    params_before / params_after: parameter counts. flops_before / flops_after: 2 x the
    multiply-adds of the Linear/Conv2d layers per sample. relative_error:
    ``||f - f#||_n / ||f||_n`` over the data. layers: per-layer details (lambda, N(lambda),
    the chosen indices in order, the objective before/after the selection, Theorem 1's leverage
    constraint Σ_{j∈J} τ̃_j⁻¹ <= (5/3) m m♯ as ``leverage_inv_sum`` / ``leverage_limit`` /
    ``leverage_ok``).
    """

    widths_before: Dict[str, int]
    widths_after: Dict[str, int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    relative_error: float
    procedure: str
    layers: List[LayerReport]

    def __str__(self) -> str:
        lines = [f"spectral pruning ({self.procedure}): params {self.params_before} -> {self.params_after}, "
                 f"FLOPs {self.flops_before} -> {self.flops_after}, relative error {self.relative_error:.4g}"]
        for l in self.layers:
            lines.append(f"  {l.name}: {l.width_before} -> {l.width_after} (lambda={l.lam:.3g}, "
                         f"N(lambda)={l.dof:.1f}, L={l.objective:.4g} of {l.initial_objective:.4g})")
        return "\n".join(lines)


@dataclasses.dataclass
class _Layer:
    """What the selection of one site needs: its covariance, λ, kept width and leverage scores."""

    site: Site
    cov: torch.Tensor
    lam: float
    width: Optional[int] = None  # None: the layer is left alone
    leverage: Optional[torch.Tensor] = None
    dof: float = 0.0


# ---- arguments and data --------------------------------------------------------------------------


def _per_layer(spec, name: str, index: int):
    if isinstance(spec, dict):
        return spec.get(name)
    if isinstance(spec, (list, tuple)):
        return spec[index] if index < len(spec) else None
    return spec


def _check_widths(widths) -> None:
    if widths is None:
        raise ValueError("widths is required: a dict/list of widths, a ratio in (0, 1], or 'lambda'")
    if isinstance(widths, str) and widths != "lambda":
        raise ValueError(f"widths must be a dict, a list, a ratio or 'lambda', got {widths!r}")
    if isinstance(widths, float) and not 0.0 < widths <= 1.0:
        raise ValueError(f"a widths ratio must be in (0, 1], got {widths}")


def _check_names(sites: List[Site], widths, lam, tau) -> None:
    """Per-layer specs name only prunable layers and list at most one entry per site."""
    names = [s.name for s in sites]
    for what, spec in (("widths", widths), ("lam", lam), ("tau", tau)):
        if isinstance(spec, dict):
            unknown = [n for n in spec if n not in names]
            if unknown:
                raise ValueError(f"{what} names layers that cannot be pruned or do not exist: {unknown}; "
                                 f"prunable layers: {names}")
    if isinstance(widths, (list, tuple)) and len(widths) > len(sites):
        raise ValueError(f"widths has {len(widths)} entries but the model has {len(sites)} prunable layers: {names}")


def _batches(data) -> Sequence[Any]:
    if isinstance(data, torch.Tensor):
        return [data]
    if data is None:
        raise ValueError("data is required: an input tensor or an iterable of batches")
    if iter(data) is data:  # one-shot iterator: keep the batches for the second pass
        data = list(data)
    return data


def _limited(batches, max_batches: Optional[int], enabled: bool, desc: str):
    """The batches (at most ``max_batches``) with a progress bar."""
    for i, batch in enumerate(_progress(batches, desc, enabled=enabled)):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _width(spec, name: str, m: int, lam: float, mu: torch.Tensor) -> int:
    """The kept width of a layer from its ``widths`` entry: a width, a ratio or 'lambda' (eq. 3)."""
    if isinstance(spec, str):
        if spec != "lambda":
            raise ValueError(f"widths['{name}'] must be a width, a ratio in (0, 1] or 'lambda', got {spec!r}")
        return width_from_lambda(mu, lam)
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"widths['{name}']: a ratio must be in (0, 1], got {spec}")
        return max(1, min(m, int(round(spec * m))))
    return V.check_int(f"widths['{name}']", spec, lo=1, hi=m)


# ---- the steps -----------------------------------------------------------------------------------


def _calibrate(work: nn.Module, sites: List[Site], batches, forward: Forward, device, dtype,
               max_batches: Optional[int], bar: bool) -> Dict[str, torch.Tensor]:
    """One pass over the data (``work`` as it is: eval mode is the caller's): the covariance of
    every site's φ (the consumer's input; after a Flatten read as (B, m, positions))."""
    accs = {s.name: CovarianceAccumulator(dtype=dtype) for s in sites}

    def make_hook(acc: CovarianceAccumulator, m: int):
        def pre(mod, args):
            x = args[0]
            if isinstance(mod, nn.Linear):
                if x.shape[-1] == m:
                    acc.update(x.reshape(-1, m))
                else:  # after Flatten: (B, m * positions), channel-major
                    acc.update(x.reshape(x.shape[0], m, x.shape[-1] // m))
            else:
                acc.update(x)
        return pre

    hooks = [get_submodule(work, s.capture).register_forward_pre_hook(make_hook(accs[s.name], s.m)) for s in sites]
    n_batches = 0
    inputs_checked = forward is None  # with a custom forward the input is not known
    try:
        with torch.no_grad():
            for batch in _limited(batches, max_batches, bar, "spectral_prune: covariances"):
                if forward is None:
                    x = input_of(batch)
                    if not isinstance(x, torch.Tensor):
                        inputs_checked = False
                    elif x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
                        raise ValueError(f"data: batch {n_batches} contains NaN or Inf; "
                                         "the calibration inputs must be finite")
                run_batch(work, batch, forward, device)
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    if n_batches == 0:
        raise ValueError("data holds no batches")
    covs = {s.name: accs[s.name].covariance() for s in sites}
    _check_calibration(sites, covs, inputs_checked, dtype)
    for s in sites:
        if covs[s.name].shape[0] != s.m:
            raise unsupported(s.capture, get_submodule(work, s.capture),
                              f"its input has {covs[s.name].shape[0]} channels, expected {s.m}")
    return covs


def _check_calibration(sites: List[Site], covs, inputs_checked: bool, dtype: torch.dtype) -> None:
    """Raises on the first layer (forward order) whose accumulated covariance is not finite
    (covariance_accumulate does not check the activations; this is the one cheap check)."""
    for s in sites:
        if bool(torch.isfinite(covs[s.name]).all()):
            continue
        cause = ("the model produced NaN/Inf from finite calibration data" if inputs_checked
                 else "the calibration data or the model produced NaN/Inf")
        if dtype == torch.float32:
            cause += " (or the squares of huge activations overflowed the float32 accumulator: try dtype=torch.float64)"
        raise ValueError(f"the activations at the input of layer '{s.capture}' (the units of layer "
                         f"'{s.name}') contain NaN or Inf after calibration: {cause}")


def _plan(sites: List[Site], covs, widths, lam, lam_rel: float) -> Dict[str, _Layer]:
    """Per site: λ (given, else ``lam_rel Tr Σ``), the kept width, N̂(λ) and the leverage scores."""
    plans: Dict[str, _Layer] = {}
    for i, s in enumerate(sites):
        S = covs[s.name]
        l = _per_layer(lam, s.name, i)
        l = default_lambda(S, lam_rel) if l is None else check_lambda(l)
        plan = plans[s.name] = _Layer(s, S, float(l))
        spec = _per_layer(widths, s.name, i)
        if spec is None:
            continue
        mu, U = eigh(S)
        plan.width = _width(spec, s.name, s.m, plan.lam, mu)
        plan.leverage = leverage_from_eigh(mu, U, plan.lam)
        plan.dof = degrees_of_freedom(mu, plan.lam)
    return plans


def _output_matrix(work: nn.Module, plan: _Layer, plans, chosen, procedure: str) -> torch.Tensor:
    """Z of a site from its consumer's weight: the next site's leverage scores (if it is pruned)
    and, in the backward procedure, its units already kept."""
    s = plan.site
    keep_next, lev_next = None, None
    nxt = plans.get(s.next_site) if s.next_site is not None else None
    if nxt is not None and nxt.width is not None:
        lev_next = nxt.leverage
        if procedure == "backward" and s.next_site in chosen:
            keep_next = chosen[s.next_site][0]
    W3 = consumer_weight(get_submodule(work, s.consumer), s.m)
    return output_matrix(W3, s.m, keep_next, lev_next).to(plan.cov.dtype).to(plan.cov.device)


def _count_flops(model: nn.Module, sample, forward: Forward, device) -> int:
    """2 x multiply-adds of the Linear and Conv2d layers for one sample of ``sample``'s batch."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += 2 * out.numel() * mod.in_features
        else:
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += 2 * out.numel() * k

    run_hooked(model, [mm.register_forward_hook(hook) for mm in model.modules()
                       if is_layer(mm, (nn.Linear, nn.Conv2d))], sample, forward, device)
    try:
        n = batch_size(input_of(sample) if forward is None else sample)
    except ValueError:
        n = 1
    return int(total[0] // max(n, 1))


def _flat_out(y) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y.reshape(y.shape[0], math.prod(y.shape[1:])) if y.dim() > 0 else y.reshape(1, 1)
    if isinstance(y, (tuple, list)):
        return torch.cat([_flat_out(t) for t in y], dim=1)
    raise TypeError(f"model outputs must be tensors (or tuples of tensors), got {type(y).__name__}")


def _relative_error(model: nn.Module, work: nn.Module, batches, forward: Forward, device,
                    max_batches: Optional[int], bar: bool) -> float:
    """``‖f − f♯‖_n / ‖f‖_n`` over the data (both models as they are)."""
    num = den = 0.0  # summed on the outputs' device, read once at the end
    with torch.no_grad():
        for batch in _limited(batches, max_batches, bar, "spectral_prune: error"):
            y = _flat_out(run_batch(model, batch, forward, device)).to(torch.float64)
            y2 = _flat_out(run_batch(work, batch, forward, device)).to(torch.float64)
            num = num + ((y - y2) ** 2).sum()
            den = den + (y**2).sum()
    num, den = float(num), float(den)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


# ---- the pruner ----------------------------------------------------------------------------------


def spectral_prune(
    model: nn.Module,
    data,
    *,
    widths: Union[None, float, str, Sequence[Optional[int]], Dict[str, int]] = None,
    procedure: str = "backward",
    theta: float = DEFAULT_THETA,
    lam: Union[None, float, Dict[str, float]] = None,
    lam_rel: float = DEFAULT_LAMBDA_REL,
    tau: Union[None, float, Dict[str, Any]] = None,
    output_aware: bool = True,
    dtype: torch.dtype = torch.float64,
    device: Optional[Union[str, torch.device]] = None,
    forward: Forward = None,
    max_batches: Optional[int] = None,
    progress: bool = True,
) -> Tuple[nn.Module, PruneReport]:
    """Spectral pruning of a network; returns ``(pruned_model, report)``.

    Args:
        model: an ``nn.Sequential`` (nested Sequentials allowed) of Linear / Conv2d /
            BatchNorm / activation / Dropout / pooling / Flatten layers and ResNet blocks, or a
            single residual block. The pruned units are the outputs of every Linear/Conv2d
            whose output reaches the next Linear/Conv2d through element-wise layers,
            BatchNorm/PReLU over those units, pooling over the spatial axes of Conv2d outputs
            and at most one Flatten before a Linear head (of a Conv2d output, or of a 2-D Linear
            output); the covariance is that of the consumer's input. Not prunable (left alone):
            pooling after a Flatten or a Linear (it pools neighbouring units), a flattened 3-D
            Linear output (units interleaved), a BatchNorm1d/PReLU after a Linear whose input in
            the data is not 2-D (it acts on dim 1, e.g. T of (B, T, m), not on the units; checked
            on the first batch). Also the inner channels of residual blocks
            (outputs of conv1, and of conv2 in a Bottleneck). Residual channels are untouched.
            The model is never modified; a copy is rewritten.
        data: an input tensor or a re-iterable of batches (tensors, or tuples/lists whose first
            element is the input, or dicts with an ``input``/``inputs``/``x`` entry). Used for
            the covariances and for the reported error.
            Input tensors with NaN/Inf raise ValueError naming the batch; so do non-finite
            activations (checked once per layer on its covariance), naming the layer.
        widths: units to keep: a dict ``{layer name: width}`` (names as in
            ``model.named_modules()``; layers not listed are left alone), a list in forward
            order (``None`` entries left alone), a float ratio in (0, 1] for every layer, or
            ``"lambda"``: the width of eq. (3) for the layer's lambda.
        procedure: ``"backward"`` (layers from the output back; the output matrix Z of a
            layer uses the units already kept in the next layer) or ``"simultaneous"`` (every
            layer independently, Z from all next units).
        theta: weight of the input information loss (paper default 0.5).
        lam: lambda per layer (float or dict); None: ``lam_rel * Tr Sigma`` (paper: 1e-6).
        tau: ridge per layer: None (``m# lambda leverage``), a float for every unit, or a dict
            ``{layer name: float or (m,) tensor}``.
        output_aware: build Z from the next layer's weights (paper); False uses Z = I.
        dtype: covariance accumulator dtype (float64 or float32).
        device: device the batches are moved to (default: left where they are).
        forward: ``forward(model, batch)`` for batches the model cannot take directly.
        max_batches: use at most this many batches for the covariances.
        progress: tqdm progress bars.

    The model runs in eval mode (BatchNorm on its running statistics, no dropout); every
    module's mode is restored, and the pruned copy has the modes of the input model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if procedure not in ("backward", "simultaneous"):
        raise ValueError(f"procedure must be 'backward' or 'simultaneous', got {procedure!r}")
    theta = check_theta(theta)
    _check_widths(widths)
    if max_batches is not None:
        max_batches = V.check_int("max_batches", max_batches, lo=1)
    sites = structural_sites(model)  # raises on layers it cannot rewrite
    batches = _batches(data)
    work = copy.deepcopy(model)
    with eval_mode(work):
        first = next(iter(batches), None)
        if first is not None:  # drop the sites whose norms are not over the units for this data
            sites = units_on_dim1(work, sites, first, forward, device)
        _check_names(sites, widths, lam, tau)
        active = [s for i, s in enumerate(sites) if _per_layer(widths, s.name, i) is not None]
        if not active:
            raise ValueError(f"no layer to prune (prunable layers: {[s.name for s in sites]})")
        covs = _calibrate(work, sites, batches, forward, device, dtype, max_batches, progress)
    plans = _plan(sites, covs, widths, lam, lam_rel)

    # selection, from the output back (backward) or layer by layer (simultaneous)
    chosen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    reports: Dict[str, LayerReport] = {}
    for s in (reversed(active) if procedure == "backward" else active):
        p = plans[s.name]
        t = _per_layer(tau, s.name, sites.index(s))
        t = check_tau(paper_tau(p.width, p.lam, p.leverage) if t is None else t, s.m, p.cov.device)
        Z = _output_matrix(work, p, plans, chosen, procedure) if output_aware and theta < 1.0 else None
        res = greedy_select(p.cov, p.width, tau=t, theta=theta, Z=Z)
        chosen[s.name] = (res.indices, reconstruction(p.cov, res.indices, t))
        inv_sum, limit = leverage_constraint(p.leverage, res.indices, p.width)
        if not inv_sum <= limit:
            warnings.warn(f"spectral_prune: layer '{s.name}': the chosen units violate Theorem 1's "
                          f"leverage constraint sum(1/tau~_j) = {inv_sum:.4g} > (5/3) m m# = {limit:.4g}; "
                          "the theorem's error bound does not apply to this selection", stacklevel=2)
        reports[s.name] = LayerReport(s.name, s.m, p.width, p.lam, p.dof, res.indices.cpu(),
                                      float(res.objective[-1]), res.initial_objective, inv_sum, limit)

    for s in active:  # the copy's modules have their own modes again: the new ones take them
        rewrite_site(work, s, *chosen[s.name])

    first = next(iter(batches))
    with eval_mode(model), eval_mode(work):
        flops_before = _count_flops(model, first, forward, device)
        flops_after = _count_flops(work, first, forward, device)
        rel = _relative_error(model, work, batches, forward, device, max_batches, progress)
    return work, PruneReport(
        widths_before={s.name: s.m for s in active},
        widths_after={s.name: plans[s.name].width for s in active},
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in work.parameters()),
        flops_before=flops_before,
        flops_after=flops_after,
        relative_error=rel,
        procedure=procedure,
        layers=[reports[s.name] for s in active],
    )
