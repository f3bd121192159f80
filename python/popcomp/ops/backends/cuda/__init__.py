"""The CUDA kernels of the ops (the compiled core): importing this registers them."""
from . import covariance_accumulate, greedy_select, kmeans1d, palettized, sumsq_outer_acc  # noqa: F401
