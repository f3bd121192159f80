"""The pure-torch references of the ops: importing this registers them as each op's default
kernel (CompositeExplicitAutograd: every device without its own kernel, the compiled core
absent included)."""
from . import covariance_accumulate, greedy_select, kmeans1d, palettized, sumsq_outer_acc  # noqa: F401
