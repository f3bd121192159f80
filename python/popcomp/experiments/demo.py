"""``popcomp demo``: the main job, end to end on bundled real data, in well under two minutes.

1. Train an MLP 64-128-128-10 on sklearn's handwritten digits (shipped with scikit-learn).
2. Accumulate the Hessian diagonal of the training loss (popcomp.hessian; internal Fisher
   fallback while it is not installed).
3. Quantize every Linear weight with HW K-means (β = 0) and DRHW K-means (β by cross-validation
   on a held-out validation split) at a few bit widths (K = 2^bits clusters per layer).
4. Prune the hidden layers with spectral pruning (suzuki2020) at a few kept ratios.
5. Print one table — size in bytes, compression ratio, train/test loss and accuracy,
   generalization gap — and write it as CSV/Markdown with plots.

Quantization is ``popcomp.quantize_`` with the Hessian mapping (palettized modules compute
exactly what the dense model with the dequantized weights computes); sizes come from
``popcomp.size_report``: packed ⌈log2 K⌉-bit indices + a float32 codebook per layer + the dense
float32 biases; the entropy-coded column counts n·H(labels) + 32 bits per center (the paper's
count) instead of the packed indices. Dense and pruned models: 4 bytes per parameter.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Dict, List

import torch
from torch import nn

from ..data import load_digits
from ._common import (
    UserError, float_list, int_list, markdown_table, progress, pyplot, resolve_options, savefig,
    start, write_json, write_table
)
from ._nn import evaluate, hessian_diagonal, make_mlp, n_params, train

BETAS = (1e-4, 1e-3, 1e-2, 3e-2, 0.1)
# dest -> (default, default under --quick); options given explicitly are never changed
PRESETS = {"epochs": (40, 20), "bits": ("2,3,4", "2,4"), "keep": ("0.5,0.25", "0.5")}


def add_arguments(p) -> None:
    p.add_argument("--bits", default=None,
                   help="bit widths of the quantization, each in 1..8 (default 2,3,4; 2,4 with --quick)")
    p.add_argument("--keep", default=None,
                   help="kept fractions of hidden units for pruning, each in (0, 1) "
                        "(default 0.5,0.25; 0.5 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 40; 20 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: small net)")


def validate(args) -> None:
    args.bit_list = int_list("--bits", args.bits)
    args.keep_list = float_list("--keep", args.keep)
    if not args.bit_list or not all(1 <= b <= 8 for b in args.bit_list):
        raise UserError(f"--bits must lie in 1..8, got {args.bits!r}")
    if not all(0 < k < 1 for k in args.keep_list):
        raise UserError(f"--keep must lie in (0, 1), got {args.keep!r}")
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")


def _dense_bytes(model: nn.Module) -> int:
    return 4 * n_params(model)


def _quantize_copy(model: nn.Module, H: Dict[str, torch.Tensor], bits: int, beta: float, seed: int):
    """HW (β = 0) / DRHW (β > 0) palettization of every Linear weight of a copy of the model with
    ``popcomp.quantize_`` (per-tensor codebook, exact K-means, fp32 codebook), one call per layer
    so that β is per weight on that layer's mean-1 Hessian (as ``repro nn``).

    Returns the palettized copy, its size in bytes (packed indices + codebooks + the dense rest)
    and its entropy-coded size in bytes (n·H(labels) + 32 bits per center + the dense rest).
    """
    import popcomp

    q = copy.deepcopy(model)
    names = [n for n, m in q.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        h = H[name + ".weight"].double().clamp_min(0)
        h = h + 1e-12 * h.mean() + 1e-30
        h = (h / h.mean()).float()
        cfg = popcomp.PalettizeConfig(bits=bits, granularity="per_tensor", beta=beta * h.numel(),
                                      method="exact", seed=seed, codebook_dtype=torch.float32)
        popcomp.quantize_(q, cfg, hessian={name + ".weight": h},
                          filter_fn=lambda m, fqn, name=name: fqn == name)
    rep = popcomp.size_report(q)
    packed = rep.total.packed_bytes + rep.other_params_bytes
    entropy = int(math.ceil(rep.total.entropy_bits / 8)) + rep.other_params_bytes
    return q, packed, entropy


def _spectral_prune(model: nn.Sequential, x: torch.Tensor, keep: float):
    """``popcomp.spectral_prune`` (issue 4), backward procedure, paper defaults."""
    from ..spectral import spectral_prune

    pm, rep = spectral_prune(model, x, widths=float(keep), progress=False)
    return pm, "popcomp.spectral_prune (backward, θ = 0.5, λ = 1e-6 Tr Σ)"


def resolve(args) -> None:
    """Fill the defaults (``--quick``'s for options not given) and check every option."""
    resolve_options(args, PRESETS, validate)


def run(args) -> Dict[str, object]:
    resolve(args)
    out, dev, t0 = start(args)
    data = load_digits(device=dev)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(data.x_train.shape[0], generator=g).to(dev)
    nval = data.x_train.shape[0] // 5
    xv, yv = data.x_train[perm[:nval]], data.y_train[perm[:nval]]
    xt, yt = data.x_train[perm[nval:]], data.y_train[perm[nval:]]
    torch.manual_seed(args.seed)
    model = make_mlp(data.num_features, (128, 128), 10, dropout=0.1).to(dev)
    steps = len(args.bit_list) * (1 + len(BETAS)) + len(args.keep_list) + 2
    bar = progress(range(args.epochs + steps), desc="popcomp demo", unit="step")
    bar.set_postfix_str("training")
    train(model, xt, yt, epochs=args.epochs, lr=5e-2, momentum=0.9, batch_size=32, seed=args.seed, bar=bar)
    bar.set_postfix_str("Hessian diagonal")
    H, hess_name = hessian_diagonal(model, xt, yt, method="ggn")
    bar.update(1)

    rows: List[Dict[str, object]] = []
    base_bytes = _dense_bytes(model)

    def add(method, detail, m, size, entropy_size=None):
        trl, tra = evaluate(m, xt, yt)
        tel, tea = evaluate(m, data.x_test, data.y_test)
        rows.append({"method": method, "setting": detail, "size_bytes": size,
                     "ratio": size / base_bytes,
                     "ratio_entropy": (entropy_size if entropy_size is not None else size) / base_bytes,
                     "train_loss": trl, "train_acc": tra, "test_loss": tel, "test_acc": tea,
                     "gen_gap": tel - trl})

    add("original (fp32)", "", model, base_bytes)
    bar.update(1)
    chosen = {}
    for b in args.bit_list:
        K = 2 ** b
        bar.set_postfix_str(f"HW/DRHW {b}-bit")
        qh, sz, ent = _quantize_copy(model, H, b, 0.0, args.seed)
        add("HW K-means", f"{b}-bit (K={K})", qh, sz, ent)
        bar.update(1)
        best = None
        for beta in BETAS:  # cross-validation of β on the validation split
            qd, szd, entd = _quantize_copy(model, H, b, beta, args.seed)
            vl = evaluate(qd, xv, yv)[0]
            if best is None or vl < best[0]:
                best = (vl, beta, qd, szd, entd)
            bar.update(1)
        chosen[b] = best[1]
        add("DRHW K-means", f"{b}-bit (K={K}), β={best[1]:g} (CV)", best[2], best[3], best[4])
    prune_backend = ""
    for keep in args.keep_list:
        bar.set_postfix_str(f"spectral pruning {keep:g}")
        pm, prune_backend = _spectral_prune(model, xt, keep)
        widths = "-".join(str(m.out_features) for m in pm if isinstance(m, nn.Linear))
        add("spectral pruning", f"keep {keep:g} (64-{widths})", pm, _dense_bytes(pm))
        bar.update(1)
    bar.close()

    notes = [f"MLP 64-128-128-10 trained {args.epochs} epochs (SGD, momentum 0.9) on {xt.shape[0]} digits; "
             f"validation {xv.shape[0]} (for β), test {data.x_test.shape[0]}; device {dev}.",
             f"Hessian diagonal: {hess_name}; pruning: {prune_backend}.",
             "size: packed indices + fp32 codebook per layer + fp32 biases; ratio_entropy counts "
             "n·H(labels) + 32 bits per center instead of the packed indices.",
             "gen_gap = test loss − train loss."]
    cols = ["method", "setting", "size_bytes", "ratio", "ratio_entropy", "train_loss", "train_acc",
            "test_loss", "test_acc", "gen_gap"]
    write_table(rows, out, "demo", "popcomp demo: compression of an MLP on the bundled digits", notes)
    print(markdown_table(rows, cols, "popcomp demo", notes))

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"original (fp32)": "k", "HW K-means": "tab:blue", "DRHW K-means": "tab:orange",
              "spectral pruning": "tab:green"}
    for r in rows:
        c = colors.get(r["method"], "gray")
        axes[0].scatter(r["size_bytes"], r["test_acc"], color=c)
        axes[0].annotate(r["setting"].split(",")[0] or "fp32", (r["size_bytes"], r["test_acc"]), fontsize=6)
        axes[1].scatter(r["size_bytes"], r["gen_gap"], color=c)
    for m, c in colors.items():
        axes[0].scatter([], [], color=c, label=m)
    axes[0].set_xscale("log")
    axes[1].set_xscale("log")
    axes[0].set_xlabel("model size [bytes]")
    axes[1].set_xlabel("model size [bytes]")
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("generalization gap (test − train loss)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("accuracy vs size")
    axes[1].set_title("generalization gap vs size")
    savefig(fig, out, "demo.png")
    summary = {"experiment": "demo", "seconds": time.time() - t0, "seed": args.seed, "device": str(dev),
               "hessian": hess_name, "pruning": prune_backend, "chosen_beta": chosen, "rows": rows}
    write_json(summary, out)
    print(f"wrote {out}/demo.csv, demo.md, demo.png, results.json ({summary['seconds']:.1f} s)")
    return summary
