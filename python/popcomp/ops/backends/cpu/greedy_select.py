"""The CPU kernel of popcomp::greedy_select (the compiled core)."""
from __future__ import annotations

from ...._backend import compiled, num_threads
from ..._library import LIB
from ...checks import check_greedy_select, check_greedy_select_values
from .. import compiled_args


def greedy_select_cpu(cov, k, tau, theta, Z):
    check_greedy_select(cov, k, tau, theta, Z)
    check_greedy_select_values(cov, tau, Z)
    C = compiled()
    return compiled_args.greedy_select(
        cov, k, tau, theta, Z,
        lambda **kwargs: C.greedy_select_cpu(**kwargs, num_threads=num_threads()),
    )


LIB.impl("greedy_select", greedy_select_cpu, "CPU")
