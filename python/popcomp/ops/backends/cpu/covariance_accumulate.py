"""The CPU kernel of popcomp::covariance_accumulate (the compiled core)."""
from __future__ import annotations

from ...._backend import compiled, num_threads
from ..._library import LIB
from ...checks import check_covariance_accumulate
from .. import compiled_args


def covariance_accumulate_cpu(x, acc, count):
    check_covariance_accumulate(x, acc, count)
    C = compiled()
    compiled_args.covariance_accumulate(
        x, acc, count,
        lambda **kwargs: C.covariance_accumulate_cpu(**kwargs, num_threads=num_threads()),
    )


LIB.impl("covariance_accumulate", covariance_accumulate_cpu, "CPU")
