"""The ``popcomp`` command line: ``demo``, ``repro <name>``, ``info``, ``quantize``.

User mistakes (bad options, unknown names, impossible settings) print one clear message and exit
with status 2; they never print a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import List, Optional

from .experiments import EXPERIMENTS
from .experiments._common import UserError

_DESCR = {
    "linreg": "bu2020 §5.3: ERM vs Oracle (eq. 25) vs K-means on linear regression (Figs. 2-4)",
    "nn": "bu2020 §7: HW vs DRHW K-means on many MLPs trained on bundled digits (Figs. 5, 7)",
    "spectral": "suzuki2020 §5.1: eigenvalue decay, compression error vs width, accuracy vs λ, θ",
    "bounds": "zhang2020 diagnostics (norms, stable rank, cushions, effective parameters) + Table 1",
}


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed, 0..2^32-1 (default 0)")
    p.add_argument("--out", default=None, help=f"output folder (default popcomp-out/{name})")
    p.add_argument("--quick", action="store_true",
                   help="small defaults, finishes in under a minute (options given explicitly still win)")
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="popcomp",
        description="popcomp: generalization-aware compression for PyTorch (demo, paper "
                    "reproductions, backend info)",
    )
    sub = ap.add_subparsers(dest="command", metavar="{demo,repro,info,quantize}")
    sub.required = True
    p = sub.add_parser("demo", help="train a small net on bundled digits, quantize (HW/DRHW), prune, report")
    _common(p, "demo")
    from .experiments import demo as _demo

    _demo.add_arguments(p)
    rp = sub.add_parser("repro", help="reproduce a paper experiment: " + ", ".join(EXPERIMENTS))
    rsub = rp.add_subparsers(dest="experiment", metavar="{" + ",".join(EXPERIMENTS) + "}")
    rsub.required = True
    for name in EXPERIMENTS:
        q = rsub.add_parser(name, help=_DESCR[name], description=_DESCR[name])
        _common(q, name)
        importlib.import_module(f".experiments.{name}", __package__).add_arguments(q)
    sub.add_parser("info", help="print popcomp.backends() and versions")
    _quantize_parser(sub)
    return ap


def _quantize_parser(sub) -> None:
    q = sub.add_parser(
        "quantize", help="palettize a safetensors checkpoint one tensor at a time (larger than memory)",
        epilog="Under 'torchrun --nproc-per-node N -m popcomp.cli quantize ...' the tensors are "
               "split across the ranks; the output file is the same.",
        description="Palettize the '.weight' tensors (2+ dims, floating) of safetensors shards one "
                    "tensor at a time into popcomp's packed format (load it with popcomp.load into "
                    "a model built from its config); other tensors are copied.")
    q.add_argument("inputs", nargs="+", help="the checkpoint's safetensors files")
    q.add_argument("--out", required=True, help="the output safetensors file")
    q.add_argument("--hessian", nargs="+", default=None,
                   help="safetensors files of Hessian diagonals under the weights' names")
    q.add_argument("--bits", type=int, default=None, help="bits per index, 1..8 (default 4)")
    q.add_argument("--k", type=int, default=None, help="centers per codebook, 2..256")
    q.add_argument("--granularity", default="per_channel",
                   choices=["per_tensor", "per_channel", "per_group"])
    q.add_argument("--group-size", type=int, default=None, help="per_group: inputs per codebook (default 128)")
    q.add_argument("--beta", type=float, default=0.0, help="diameter penalty, absolute")
    q.add_argument("--beta-rel", type=float, default=None, help="diameter penalty, relative (scale-free)")
    q.add_argument("--method", default="exact", choices=["exact", "lloyd"])
    q.add_argument("--codebook-dtype", default="float16", choices=["float16", "float32"])
    q.add_argument("--no-progress", action="store_true", help="no progress bar")


def _quantize(args: argparse.Namespace) -> int:
    import torch

    from .quantize.config import PalettizeConfig
    from .quantize.stream import quantize_checkpoint

    bits = args.bits if args.bits is not None or args.k is not None else 4
    try:
        cfg = PalettizeConfig(k=args.k, bits=bits, granularity=args.granularity,
                              group_size=args.group_size, beta=args.beta, beta_rel=args.beta_rel,
                              method=args.method, codebook_dtype=getattr(torch, args.codebook_dtype))
        for p in list(args.inputs) + list(args.hessian or []):
            if not os.path.isfile(p):
                raise UserError(f"no such file: {p}")
        pal = quantize_checkpoint(args.inputs, args.out, cfg, hessian=args.hessian,
                                  progress=not args.no_progress)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun: one summary, from rank 0
        return 0
    n = sum(m.numel for m in pal.values())
    orig = sum(m.numel * torch.finfo(m.weight_dtype).bits // 8 for m in pal.values())
    size = os.path.getsize(args.out)
    print(f"{len(pal)} tensors palettized ({n} weights, {orig} bytes as stored before); "
          f"{args.out}: {size} bytes in all")
    return 0


def _info() -> int:
    import torch

    import popcomp

    print(f"popcomp {popcomp.__version__}, torch {torch.__version__}")
    print(json.dumps(popcomp.backends(), indent=2))
    return 0


def _experiment(args: argparse.Namespace):
    name = "demo" if args.command == "demo" else args.experiment
    return name, importlib.import_module(f".experiments.{name}", __package__)


def _resolve(args: argparse.Namespace):
    """Complete the parsed options in place: the output folder, the defaults (``--quick`` changes
    only the defaults of options not given) and every check that needs no work; returns the
    experiment's module. Raises UserError on a bad option."""
    name, mod = _experiment(args)
    if args.out is None:
        args.out = os.path.join("popcomp-out", name)
    mod.resolve(args)
    return mod


def resolve_args(argv: List[str]) -> argparse.Namespace:
    """The settings ``popcomp ARGV`` would run with, without running anything (for tests and
    scripts). argparse errors exit as usual (SystemExit 2); bad values raise UserError."""
    args = build_parser().parse_args(argv)
    if args.command not in ("info", "quantize"):
        _resolve(args)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)  # argparse prints usage + message and exits 2 on bad options
    prog = "popcomp " + args.command + (f" {args.experiment}" if args.command == "repro" else "")
    try:
        if args.command == "info":
            return _info()
        if args.command == "quantize":
            return _quantize(args)
        mod = _resolve(args)  # bad values are reported here, before any output is written
        mod.run(args)
        return 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        # too large a setting for this machine (torch's allocators raise RuntimeError)
        msg = str(e).lower()
        if not isinstance(e, MemoryError) and "memory" not in msg:
            raise
        print(f"{prog}: error: out of memory with these settings ({str(e).splitlines()[0][:200]}); "
              "choose smaller sizes (see --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("popcomp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
