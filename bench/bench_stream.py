"""Time and peak memory of ``popcomp quantize`` (quantize_checkpoint) on a synthetic checkpoint of
Llama-7B shape, generated on the fly into a temporary folder.

Each layer holds 4 projections of 4096 x 4096 (q, k, v, o) and 3 of 11008 x 4096 (gate, up,
down as stored (out, in): down is 4096 x 11008) in float16 plus two norms, one shard per layer;
quantized per channel, 4 bits, exact K-means (no Hessian). The quantization runs in a child
process (``python -m popcomp.cli quantize``, or ``torchrun --nproc-per-node N`` with
``--nproc N``) so its peak RSS (resource.getrusage of the children: the largest single
process) excludes the generation. ``--layers L`` runs L of the 32 layers and extrapolates the
time linearly; the peak memory should not grow with L (bounded by the largest tensor).

    python bench/bench_stream.py [--layers 2] [--nproc 1] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch


def shapes(hidden: int, ffn: int):
    return {"self_attn.q_proj.weight": (hidden, hidden),
            "self_attn.k_proj.weight": (hidden, hidden),
            "self_attn.v_proj.weight": (hidden, hidden),
            "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
            "mlp.down_proj.weight": (hidden, ffn), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,)}


def generate(folder: str, layers: int, hidden: int, ffn: int) -> list:
    import safetensors.torch as st

    g = torch.Generator().manual_seed(0)
    files = []
    for i in range(layers):
        sd = {f"model.layers.{i}.{k}": (torch.randn(s, generator=g) * 0.02).half()
              for k, s in shapes(hidden, ffn).items()}
        p = os.path.join(folder, f"model-{i + 1:05d}-of-{layers:05d}.safetensors")
        st.save_file(sd, p)
        files.append(p)
        del sd
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc-per-node)")
    ap.add_argument("--keep", default=None,
                    help="a folder to write into and keep (default: a temporary one)")
    args = ap.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="popcomp-bench-stream-")
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    files = generate(folder, args.layers, args.hidden, args.ffn)
    gen_s = time.perf_counter() - t0
    in_bytes = sum(os.path.getsize(f) for f in files)
    out = os.path.join(folder, "model-4bit.safetensors")
    cli = ["-m", "popcomp.cli", "quantize", *files, "--bits", "4", "--granularity", "per_channel",
           "--method", "exact", "--out", out, "--no-progress"]
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                               "--master-addr", "127.0.0.1", "--master-port", "29533"]
                              if args.nproc > 1 else []) + cli
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    q_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB (Linux)
    largest = max(args.hidden * args.ffn, args.hidden ** 2) * 2 / 2 ** 20
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, "
          f"ranks {args.nproc}")
    print(f"{args.layers} layer(s): {in_bytes / 2 ** 30:.2f} GiB in (generated in {gen_s:.1f} s), "
          f"{os.path.getsize(out) / 2 ** 30:.3f} GiB out")
    print(f"quantize: {q_s:.1f} s ({q_s / args.layers:.1f} s per layer); peak RSS of the largest "
          f"process {peak:.0f} MiB (largest input tensor {largest:.0f} MiB)")
    if args.layers != 32:
        print(f"extrapolated to 32 layers: {q_s / args.layers * 32 / 60:.1f} min "
              f"(the embedding and head of a real 7B model add about 2 x 131M weights)")
    if not args.keep:
        for f in files + [out]:
            os.remove(f)
        os.rmdir(folder)


if __name__ == "__main__":
    main()
