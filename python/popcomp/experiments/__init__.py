"""Reproducible experiments behind ``popcomp repro <name>`` and ``popcomp demo``.

Each module exposes ``run(args) -> dict`` writing PNG plots and CSV/Markdown tables into
``args.out``; the CLI (``popcomp.cli``) builds ``args``.
"""
EXPERIMENTS = ("linreg", "nn", "spectral", "bounds")
