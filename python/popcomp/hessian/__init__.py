"""Diagonal of the loss Hessian over calibration data (the sensitivities of HW / DRHW K-means).

    h = popcomp.hessian.diagonal(model, loss_fn, loader, method="fisher")
    h["fc1.weight"]          # float32, shaped like the parameter, summed over samples
    h.num_samples            # how many samples were seen; h.mean() divides by it

A sample's loss l_s is what ``loss_fn`` returns for a batch holding that sample alone; with a
"mean" reduction the batch loss is (1/B) sum_s l_s and the per-sample quantities are rescaled
accordingly (detected from ``loss_fn.reduction``, or by probing the first batch). The model is
evaluated in eval mode (no dropout noise, BatchNorm on its running statistics; each module's
mode is restored after every batch) unless ``eval_mode=False``.

Methods
  fisher      sum_s (d l_s / d w)^2, exact, without materializing per-sample gradients: the
              gradients w.r.t. each layer's output are combined with its input by the fused op
              ``popcomp::sumsq_outer_acc`` (Linear, Conv1d/Conv2d on unfolded patches, Embedding).
  ggn         exact diagonal of the generalized Gauss-Newton matrix sum_s J_s^T H_s J_s for
              nn.MSELoss, nn.CrossEntropyLoss and nn.BCEWithLogitsLoss: the columns of a square
              root of H_s (C - 1 per position for CrossEntropy) are backpropagated and reduced
              by the same op.
  ggn_mc      Monte-Carlo GGN: ``mc_samples`` columns per sample drawn from the model's
              predictive distribution (sampled labels), an unbiased estimate of ``ggn``.
  hutchinson  E[z * (H z)] with Rademacher probes z, for any differentiable model and any
              parameter (the Hessian of sum_s l_s).

fisher/ggn/ggn_mc backpropagate their columns by hand, without autograd, through Sequentials
of Linear/Conv layers and elementwise layers (``chain``), and with (vmapped) autograd through
any other model (``generic``).

Modules of this package
  accumulator  HessianAccumulator (setup, update, accumulate, result, reset), HessianDiagonal,
               diagonal()
  methods      the estimators, one class each, registered by name (REGISTRY)
  losses       loss factors keyed by loss type (LOSS_FACTORS), the per-sample loss scale
  modules      per-module reducers keyed by module type (REDUCERS), choice of the modules
  chain        the hand-written backprop engine for Sequentials
  generic      the autograd path: forward hooks and (vmapped) backprop of columns
"""
from .accumulator import HessianAccumulator, HessianDiagonal, diagonal
from .methods import REGISTRY as _REGISTRY
from .modules import REDUCERS as _REDUCERS

__all__ = ["diagonal", "HessianAccumulator", "HessianDiagonal", "METHODS", "SUPPORTED_MODULES"]

METHODS = tuple(_REGISTRY)  # ("fisher", "ggn", "ggn_mc", "hutchinson")
SUPPORTED_MODULES = tuple(_REDUCERS)  # (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
