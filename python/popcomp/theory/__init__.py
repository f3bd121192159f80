"""Bounds and diagnostics of the three papers behind popcomp, as documented formulas: the public names of :mod:`.bu2020`, :mod:`.zhang2020` and :mod:`.suzuki2020`.

Equation numbers refer to the papers in ``shared/papers``:

* **bu2020** — Bu, Gao, Zou, Veeravalli, *Information-theoretic understanding of population risk
  improvement with model compression* (AAAI 2020): Theorem 1 (eq. 10), eq. (12)/(28),
  Theorem 2 (eq. 13), Lemma 3 (eq. 17), Theorem 3 (eq. 19), Theorem 4 (eqs. 22-23), the Oracle
  compressor (eq. 25), Corollary 1 (eq. 26), and a Monte-Carlo upper bound on I(W;Ŵ) for a
  K-means quantizer with centres stored at a finite resolution (``quantizer_rate_upper``). All
  logarithms are natural: mutual informations and rates are in **nats**.
* **zhang2020** — Zhang, *Compression-based generalization bounds* (survey of Arora et al. 2018):
  Definitions 4.1-4.3 (norms, stable rank), Lemma 4.4 (SVD truncation), Lemma 4.5 (random
  projection with a helper string), Definitions 5.2-5.6 (noise sensitivity, cushions, activation
  contraction), the effective-parameter counts of Theorems 5.1 and 5.7 **without** their hidden
  constants and logarithmic factors.
* **suzuki2020** — Suzuki et al., *Spectral pruning* (IJCAI 2020): degrees of freedom N̂(λ) and
  eq. (3) linking width and λ (aliases of :mod:`popcomp.spectral.quantities`), the norm bounds
  R, R_b of the paper's model class, the variance term δ₂ and bias proxy Σ√λ_ℓ of Theorem 2,
  and the Table 1 intrinsic-dimensionality comparison.

Everything here is plain torch (float64 where it matters) and works on any device.
"""
from __future__ import annotations

from . import bu2020, suzuki2020, zhang2020
from .bu2020 import *  # noqa: F401,F403
from .suzuki2020 import *  # noqa: F401,F403
from .zhang2020 import *  # noqa: F401,F403

__all__ = bu2020.__all__ + zhang2020.__all__ + suzuki2020.__all__
