"""Diagonal of the loss Hessian over calibration data (the sensitivities of HW / DRHW K-means).

    h = popcomp.hessian.diagonal(model, loss_fn, loader, method="fisher")
    h["fc1.weight"]          # shaped like the parameter, summed over samples; float32
                             # (float64 for a float64 model: every product in float64)
    h.num_samples            # how many samples were seen; h.mean() divides by it

    # a Hugging Face model, only its Linear layers, keyword-argument batches, no labels
    h = popcomp.hessian.diagonal(bert, None, [{"input_ids": ids, "attention_mask": mask}],
                                 filter_fn=lambda m, name: isinstance(m, nn.Linear),
                                 output_fn=lambda out: out.last_hidden_state)

The keys are the parameter names of ``model.named_parameters()`` ("<module path>.weight"),
the names ``quantize_`` looks up when given the same model. ``filter_fn(module, name)`` selects
the modules accumulated (the convention of ``quantize_``); the others may be of any type.
A batch is ``(inputs, target)`` or inputs alone; inputs is a tensor, a tuple (positional
arguments) or a dict (keyword arguments). ``output_fn`` maps the model's output to what the
loss sees (default: a tensor, else ``.logits``, else the only tensor of a dict / ModelOutput).

A sample's loss l_s is what ``loss_fn`` returns for a batch holding that sample alone; with a
"mean" reduction the batch loss is (1/B) sum_s l_s and the per-sample quantities are rescaled
accordingly (detected from ``loss_fn.reduction``, or by probing the first batch). The model is
evaluated in eval mode (no dropout noise, BatchNorm on its running statistics; each module's
mode is restored after every batch) unless ``eval_mode=False``.

Methods
  fisher      sum_s (d l_s / d w)^2, exact, without materializing per-sample gradients: the
              gradients w.r.t. each layer's output are combined with its input by the fused op
              ``popcomp::sumsq_outer_acc`` (Linear, Conv1d/2d/3d on unfolded patches,
              ConvTranspose1d/2d/3d on the columns' patches, Embedding; BatchNorm1d/2d/3d's
              affine parameters from the normalized input).
  ggn         exact diagonal of the generalized Gauss-Newton matrix sum_s J_s^T H_s J_s for
              nn.MSELoss, nn.CrossEntropyLoss and nn.BCEWithLogitsLoss (or F.mse_loss,
              F.cross_entropy, F.binary_cross_entropy_with_logits, bare or as a
              functools.partial with keyword arguments): the columns of a square
              root of H_s (C - 1 per position for CrossEntropy) are backpropagated and reduced
              by the same op.
  ggn_mc      Monte-Carlo GGN: ``mc_samples`` columns per sample drawn from the model's
              predictive distribution (sampled labels), an unbiased estimate of ``ggn``.
  hutchinson  E[z * (H z)] with Rademacher probes z, for any differentiable model and any
              parameter (the Hessian of sum_s l_s).
A warning suggests ``ggn_mc`` when ``ggn`` would backpropagate more than 256 columns per
sample (wide outputs: the exact GGN costs one backward pass per output of a sample).

Label-free (``loss_fn=None``): the loss l_s = 1/2 ||f_s - f_s0||^2 around the model's current
outputs, i.e. "keep the outputs unchanged" (embedders, distillation). Its gradient is zero at
f = f0, so its empirical Fisher is too (as for any loss whose targets are the model's own
outputs: ``fisher`` warns when all its loss gradients vanish); its Hessian is the output
Gauss-Newton J_s^T J_s, and the diagonal sum_s diag(J_s^T J_s) is what every method returns:
  ggn         exactly, one backpropagated column per output of a sample (small outputs);
  ggn_mc, fisher  from ``mc_samples`` Rademacher output probes eps per sample:
              (J_s^T eps)^2 / mc_samples is unbiased for diag(J_s^T J_s) with variance
              2 (a_i^4 - sum_j a_ij^4) / mc_samples per entry (a_ij = d f_j / d w_i, a_i^2 =
              sum_j a_ij^2), at a cost independent of the output width;
  hutchinson  the Hessian of the label-free loss (exactly J^T J at f = f0) by probes.

Which parameters: those named in ``params=`` (frozen ones too), else the trainable ones
(``requires_grad=True``) of the modules ``filter_fn`` selects (of all modules without it);
nothing else is accumulated or spent work on, and modules with no parameter asked for may be
of any type.

Data with NaN/Inf (inputs or floating targets) is refused with a ValueError naming the batch;
a diagonal that is not finite (float32 overflow beyond ~3.4e38, or a model computing NaN) is a
ValueError from ``result()`` naming the parameters (a float64 model gets a float64 diagonal).

BatchNorm runs on its running statistics in eval mode (the default, ``eval_mode=True``). With
``eval_mode=False`` and BatchNorm in training mode, the batch statistics couple the samples:
the per-sample methods accumulate a training-mode BatchNorm's own parameters (exact, with the
batch's statistics) and refuse modules whose output reaches one (use eval mode, or hutchinson).

Per-sample methods (fisher, ggn, ggn_mc) need the batch loss to be a sum or mean of losses of
the samples alone; a loss comparing samples of a batch (contrastive, InfoNCE) is refused on the
first batch with a message. ``hutchinson`` differentiates the batch loss itself: with
``reduction="mean"`` it estimates B times the Hessian of the batch loss, a batch-level estimate
for such losses. Its forward runs scaled_dot_product_attention on the math kernel (the fused
CPU/CUDA kernels have no double backward). Its estimate is unbiased but noisy (variance
sum_{j != i} H_ij^2 per probe; ``num_probes`` divides it) and entries can be negative (noise,
or negative curvature away from a minimum): ``h.clamp()`` gives the nonnegative form that
K-means weights need; ``fisher``/``ggn`` are nonnegative by construction and usually the
better sensitivities.

fisher/ggn/ggn_mc backpropagate their columns by hand, without autograd, through Sequentials
of Linear/Conv layers and elementwise layers (``chain``), and with (vmapped) autograd through
any other model (``generic``).

Modules of this package
  accumulator  HessianAccumulator (setup, update, accumulate, result, reset), HessianDiagonal,
               diagonal()
  methods      the estimators, one class each, registered by name (REGISTRY)
  losses       loss factors keyed by loss type (LOSS_FACTORS), the per-sample loss scale
  modules      per-module reducers keyed by module type (REDUCERS, LAZY_REDUCERS), choice of
               the modules (filter_fn / params)
  chain        the hand-written backprop engine for Sequentials
  generic      the autograd path: forward hooks and (vmapped) backprop of columns
"""
from .accumulator import HessianAccumulator, HessianDiagonal, diagonal
from .methods import REGISTRY as _REGISTRY
from .modules import REDUCERS as _REDUCERS

__all__ = ["diagonal", "HessianAccumulator", "HessianDiagonal", "METHODS", "SUPPORTED_MODULES"]

METHODS = tuple(_REGISTRY)  # ("fisher", "ggn", "ggn_mc", "hutchinson")
SUPPORTED_MODULES = tuple(_REDUCERS)  # Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, BatchNorm1d/2d/3d, Embedding
# and, matched by name without importing transformers, transformers.pytorch_utils.Conv1D
