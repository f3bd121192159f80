"""Reproducible experiments behind ``popcomp repro <name>`` and ``popcomp demo``.

Each module exposes ``resolve(args)`` (defaults, ``--quick``'s for options not given, and the
checks of every option) and ``run(args) -> dict`` writing PNG plots and CSV/Markdown tables into
``args.out``; the CLI (``popcomp.cli``) builds ``args``.
"""
EXPERIMENTS = ("linreg", "nn", "spectral", "bounds")
