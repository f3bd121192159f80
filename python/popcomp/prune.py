"""Compatibility module: ``popcomp.prune`` names what :mod:`popcomp.spectral` defines (spectral pruning, its quantities and reconstruction); the code lives there.

``popcomp.prune.X`` and ``popcomp.spectral.X`` are the same objects.
"""
from .spectral import *  # noqa: F401,F403
from .spectral import __all__  # noqa: F401
