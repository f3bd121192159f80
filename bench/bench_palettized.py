"""Speed of palettized (lookup-table) layers against dense ones, measured on this machine in this run.

Prints ratios (dense time / palettized time, higher is better) for the targets of issue 12:
  * Linear(4096, 4096) and Linear(4096, 11008), fp32 activations on the CPU (fp16 on a GPU),
    per-channel codebooks: batch 1 at 4 bits >= 4x faster than dense F.linear, 3 bits >= 4x,
    2 bits >= 5x; 4 bits per group of 128 with fp16 codebooks >= 3x; batch 8 >= 1.5x; batch 32
    no slower than 1.3x dense. On a GPU: batch 1 >= 2.5x and batch 16 >= 1.5x dense fp16.
  * peers in the same run: dense fp32 and dense bf16 F.linear, and the reference (decode the
    weight with pure torch, then F.linear) -- the floor a LUT kernel must beat;
  * end to end: a 6-layer encoder (hidden 384) on one sequence of 128 tokens, no slower than dense
    fp32; one decode step of a GPT-style block stack (hidden 2048) >= 2x faster than dense.
  * memory: resident bytes of the palettized layer and the peak extra memory of a forward.

A layer row times a stack of copies of the layer (distinct buffers, same values) run back to
back and divides by their number, for ours and for the dense peers alike: the stack holds at
least twice the last-level cache, so each layer reads its weights from memory as a layer of a
model does once the other layers have run, while the Python and dispatcher code stays as warm
as it is in a model's forward.

    python bench/bench_palettized.py [--device cpu|cuda] [--quick] [--threads N]

Not a test: numbers depend on the machine; see bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import popcomp
from popcomp.ops.backends.reference.palettized import palettized_linear_reference

ROWS = []


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def best_time(fn, dev, reps, warmup=2):
    for _ in range(warmup):
        fn()
    sync(dev)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def interleaved(fns, dev, reps):
    """Best time of each function, measured in turns so that all see the same machine load."""
    for f in fns:
        best_time(f, dev, 0, warmup=2)
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            best[i] = min(best[i], best_time(f, dev, 1, warmup=0))
    return best


def last_level_cache_bytes(dev) -> int:
    """The L3 of this CPU (sysfs; 32 MiB when it cannot be read) or the GPU's L2."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).L2_cache_size
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            t = f.read().strip()
        return int(t[:-1]) << {"K": 10, "M": 20, "G": 30}[t[-1]] if t[-1] in "KMG" else int(t)
    except (OSError, ValueError, KeyError):
        return 32 << 20


def stack_size(dev, layer_bytes: int) -> int:
    """Copies of a layer whose weights fill at least twice the last-level cache."""
    return max(2, math.ceil(2 * last_level_cache_bytes(dev) / layer_bytes))


def copies(module: nn.Module, n: int):
    """n copies of module, each with buffers and parameters of its own."""
    return [copy.deepcopy(module) for _ in range(n)]


def run_stack(fns):
    """One call of each function in turn (a stack of layers on the same input)."""
    def f():
        for g in fns:
            g()
    return f


def report(name, ours, peer, peer_name, target=None):
    ratio = peer / ours
    ok = None if target is None else ratio >= target
    status = {None: "", True: "PASS", False: "FAIL"}[ok]
    ROWS.append((name, ours, peer_name, peer, ratio, target, status))
    tgt = f">= {target:g}x" if target is not None else ""
    print(f"{name:<46} ours {ours * 1e3:8.3f} ms | {peer_name:<22} {peer * 1e3:8.3f} ms | "
          f"peer/ours {ratio:6.2f}x {tgt:<8} {status}", flush=True)


def palettize(layer: nn.Module, bits: int, granularity: str = "per_channel", group_size=None,
              codebook_dtype=torch.float16) -> nn.Module:
    m = nn.Sequential(copy.deepcopy(layer))
    cfg = popcomp.PalettizeConfig(bits=bits, granularity=granularity, group_size=group_size,
                                  codebook_dtype=codebook_dtype, method="lloyd", max_iter=20)
    popcomp.quantize_(m, cfg)
    return m[0]


def bench_layers(dev, shapes, batches, reps, act_dtype):
    targets_b1 = {("per_channel", 4): 4.0, ("per_channel", 3): 4.0, ("per_channel", 2): 5.0,
                  ("per_group", 4): 3.0}
    if dev.type == "cuda":
        targets_b1 = {k: 2.5 for k in targets_b1 if k == ("per_channel", 4)}
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(in_f, out_f, bias=False).to(dev)
        w32 = dense.weight.detach().to(act_dtype)
        w16 = dense.weight.detach().to(torch.bfloat16 if dev.type == "cpu" else torch.float16)
        peer16 = "dense bf16 F.linear" if dev.type == "cpu" else "dense fp16 F.linear"
        peer32 = "dense fp32 F.linear" if act_dtype == torch.float32 else "dense fp16 F.linear"
        configs = [("per_channel", 4, None), ("per_channel", 3, None), ("per_channel", 2, None),
                   ("per_group", 4, 128)]
        print(f"\n== Linear({in_f}, {out_f}), activations {act_dtype}, device {dev}")
        for gran, bits, gs in configs:
            pal = palettize(dense, bits, gran, gs).to(dev)
            packed, cb = pal.weight_packed, pal.weight_codebook
            resident = packed.numel() + cb.numel() * cb.element_size()
            print(f"   {gran} {bits} bits{f' g{gs}' if gs else ''}: resident {resident / 2**20:.1f} MiB "
                  f"(dense fp32 {w32.numel() * 4 / 2**20:.1f} MiB)")
            for B in batches:
                if (gran, bits) != ("per_channel", 4) and B != 1:
                    continue
                print(f"   batch {B}: stacks of {stack_size(dev, resident)} layers")
                x = torch.randn(B, in_f, device=dev, dtype=act_dtype)
                xb = x.to(w16.dtype)
                ref = lambda: palettized_linear_reference(x, packed, cb, None, pal.palette.bits,
                                                          in_f, pal.palette.group_size or 0)
                L = stack_size(dev, resident)
                pals, w32s, w16s = copies(pal, L), [w32.clone() for _ in range(L)], \
                    [w16.clone() for _ in range(L)]
                with torch.no_grad():
                    t_pal, t_dense, t_16 = interleaved(
                        [run_stack([lambda p=p: p(x) for p in pals]),
                         run_stack([lambda w=w: F.linear(x, w) for w in w32s]),
                         run_stack([lambda w=w: F.linear(xb, w) for w in w16s])], dev, reps)
                    t_pal, t_dense, t_16 = t_pal / L, t_dense / L, t_16 / L
                    (t_ref,) = interleaved([ref], dev, max(3, reps // 5))
                del pals, w32s, w16s
                name = f"{gran} {bits}b{f' g{gs}' if gs else ''} batch {B}"
                if B == 1:
                    target = targets_b1.get((gran, bits))
                elif B in (8, 16):
                    target = 1.5
                elif B == 32:
                    target = 1 / 1.3
                else:
                    target = None
                report(name, t_pal, t_dense, peer32, target)
                report(name, t_pal, t_16, peer16)
                report(name, t_pal, t_ref, "reference decode+linear", 1.0)


class Block(nn.Module):
    """A pre-norm transformer block from torch.nn pieces (fused SDPA attention)."""

    def __init__(self, d: int, heads: int, ff: int, causal: bool):
        super().__init__()
        self.h, self.causal = heads, causal
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x, cache=None):
        B, T, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        if cache is not None:  # a decode step: attend to the cached keys/values too
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and cache is None)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, d))
        return x + self.down(F.gelu(self.up(self.n2(x))))


def bench_models(dev, reps, quick):
    torch.manual_seed(0)
    cfg = popcomp.PalettizeConfig(bits=4, granularity="per_channel", method="lloyd", max_iter=20)
    enc = nn.Sequential(*[Block(384, 6, 1536, causal=False) for _ in range(6)]).to(dev).eval()
    x = torch.randn(1, 128, 384, device=dev)
    penc = copy.deepcopy(enc)
    popcomp.quantize_(penc, cfg)
    with torch.no_grad():
        t_p, t_d = interleaved([lambda: penc(x), lambda: enc(x)], dev, reps)
    print("\n== end to end")
    report("encoder 6x384, 1 sequence of 128 tokens", t_p, t_d, "dense fp32 model", 1.0)

    n_blocks = 2 if quick else 4
    gpt = [Block(2048, 16, 8192, causal=True).to(dev).eval() for _ in range(n_blocks)]
    pgpt = [copy.deepcopy(b) for b in gpt]
    for b in pgpt:
        popcomp.quantize_(b, cfg)
    ctx = 128
    caches = [(torch.randn(1, 16, ctx, 128, device=dev), torch.randn(1, 16, ctx, 128, device=dev))
              for _ in range(n_blocks)]
    tok = torch.randn(1, 1, 2048, device=dev)

    def step(blocks):
        def f():
            h = tok
            for b, c in zip(blocks, caches):
                h = b(h, c)
            return h
        return f

    with torch.no_grad():
        t_p, t_d = interleaved([step(pgpt), step(gpt)], dev, reps)
    report(f"GPT-style decode step, {n_blocks} blocks x 2048, ctx {ctx}", t_p, t_d,
           "dense fp32 model", 2.0)


def bench_overhead(dev, reps):
    """What the Python side adds at batch 1: the module's forward, the op through the
    dispatcher, and the compiled kernel called directly with prepared arguments."""
    C = popcomp._backend.compiled()
    name = f"palettized_linear_{dev.type}"
    if C is None or not hasattr(C, name):
        print(f"\n== wrapper overhead: no compiled {name} (the reference runs)")
        return
    from popcomp.ops.backends.cpu.palettized import linear_args
    from popcomp.ops.checks import check_palettized_linear

    print("\n== wrapper overhead at batch 1 (4 bits per channel, fp32)")
    for out_f, in_f in ((256, 256), (4096, 4096)):
        pal = palettize(nn.Linear(in_f, out_f), 4).to(dev)
        x = torch.randn(1, in_f, device=dev)
        y = torch.empty(1, out_f, device=dev)
        args = (x, pal.weight_packed, pal.weight_codebook, pal.bias, 4, in_f, 0)
        kw = linear_args(x, pal.weight_packed, pal.weight_codebook, pal.bias, y, 4, in_f, 0)
        if dev.type == "cpu":
            extra = dict(num_threads=popcomp._backend.num_threads())
        else:
            d, st = popcomp._backend.cuda_stream_args(x)
            extra = dict(device=d, stream=st)
        kernel = getattr(C, name)
        with torch.no_grad():
            t_mod, t_op, t_k, t_chk = interleaved(
                [lambda: pal(x), lambda: torch.ops.popcomp.palettized_linear(*args),
                 lambda: kernel(**kw, **extra), lambda: check_palettized_linear(*args)],
                dev, reps * 20)
        print(f"   Linear({in_f}, {out_f}): module {t_mod * 1e6:8.1f} us | op {t_op * 1e6:8.1f} us | "
              f"kernel alone {t_k * 1e6:8.1f} us | argument checks {t_chk * 1e6:6.1f} us | "
              f"overhead of the module over the kernel {(t_mod - t_k) * 1e6:6.1f} us")


def bench_memory(dev):
    """Peak extra memory of one palettized forward (must not grow with the layer)."""
    print("\n== memory (a CPU thread also keeps the decode + GEMM path's chunk buffer, at most "
          "popcomp.ops.backends.reference.palettized.CHUNK_BYTES, between calls)")
    for out_f, in_f in ((4096, 4096), (11008, 4096)):
        pal = palettize(nn.Linear(in_f, out_f, bias=False), 4).to(dev)
        for B in (1, 32):
            x = torch.randn(B, in_f, device=dev)
            bench_memory_one(dev, pal, x, in_f, out_f, B)


def peak_cpu_bytes(fn):
    """The peak of the bytes torch allocates on the CPU while fn runs (beyond what was allocated
    before): the running sum of the profiler's allocation and free events, in time order
    (allocations inside the compiled kernels, which do not go through torch, are not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an op's own net allocation (beside its children's): at its start when it allocates, at
    # its end when it frees (what it or its children allocated); frees outside any op are
    # "[memory]" events
    steps = []
    for e in prof.events():
        m = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        steps.append((e.time_range.start if m > 0 or e.name == "[memory]" else e.time_range.end, m))
    peak = cur = 0
    for _, m in sorted(steps, key=lambda s: (s[0], -s[1])):
        cur += m
        peak = max(peak, cur)
    return peak


def bench_memory_one(dev, pal, x, in_f, out_f, B):
    with torch.no_grad():
        pal(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            pal(x)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated(dev) - base
        else:  # (torch's CPU allocations are not seen by tracemalloc)
            extra = peak_cpu_bytes(lambda: pal(x))
    print(f"   Linear({in_f}, {out_f}) 4 bits batch {B}: peak extra memory of a forward "
          f"{extra / 2**20:.2f} MiB, output included (dense weight "
          f"{in_f * out_f * 4 / 2**20:.0f} MiB)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="one shape, fewer repetitions")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-models", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    reps = 5 if args.quick else 15
    print(f"popcomp {popcomp.__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, backends {popcomp.backends()}")
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}")
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    batches = [1, 16] if dev.type == "cuda" else [1, 8, 32]
    act = torch.float16 if dev.type == "cuda" else torch.float32
    bench_layers(dev, shapes, batches, reps, act)
    bench_overhead(dev, reps)
    bench_memory(dev)
    if not args.skip_models:
        bench_models(dev, reps, args.quick)
    fails = [r for r in ROWS if r[6] == "FAIL"]
    print(f"\n{len(ROWS)} rows, {sum(r[6] == 'PASS' for r in ROWS)} PASS, {len(fails)} FAIL")


if __name__ == "__main__":
    main()
