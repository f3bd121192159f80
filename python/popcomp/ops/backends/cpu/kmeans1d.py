"""The CPU kernel of popcomp::kmeans1d (the compiled core; it checks x and the weights itself)."""
from __future__ import annotations

from ...._backend import compiled, num_threads
from ..._library import LIB
from ...checks import (
    KMEANS_STATUS_MESSAGES,
    check_init_centers_values,
    check_kmeans1d,
    kmeans1d_status_error,
)
from .. import compiled_args


def kmeans1d_cpu(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter):
    check_kmeans1d(x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter)
    # init_centers here; x and weights in the kernel's pass over them
    check_init_centers_values(init_centers)
    C = compiled()

    def run(**kwargs):
        status, row = C.kmeans1d_cpu(**kwargs, num_threads=num_threads())
        if status:
            raise kmeans1d_status_error(KMEANS_STATUS_MESSAGES[status], row, x.shape[0])

    return compiled_args.kmeans1d(
        x, weights, k, beta, method, init, init_centers, max_iter, tol, seed, diameter, run
    )


LIB.impl("kmeans1d", kmeans1d_cpu, "CPU")
