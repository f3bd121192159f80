"""Speed of popcomp.hessian (fisher / ggn / ggn_mc) against a plain forward+backward and against
BackPACK (backpack-for-pytorch, measured in the same run), and of popcomp.quantize_.

    python bench/bench_hessian.py [--device cuda] [--reps 10] [--quick]

Ratios are minimum times over the minimum time of a plain forward+backward of the same model
and batch, measured alternately with it (lower is better).
Not a test: numbers depend on the machine; see bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn as nn

import popcomp
import popcomp.hessian as H

try:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared
except ImportError:  # pragma: no cover
    backpack = None


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev, reps, warmup=2):
    """Minimum wall time of fn over reps (the minimum is the most robust statistic on a
    machine shared with other jobs)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return min(ts)


def paired(fa, fb, dev, reps, warmup=2):
    """Minimum times of fa and fb, measured alternately so that both see the same load."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(reps):
        ta.append(timeit(fa, dev, 1, 0))
        tb.append(timeit(fb, dev, 1, 0))
    return min(ta), min(tb)


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def bench_case(name, model, loss_fn, X, Y, dev, reps, methods, slow_peer=False):
    model = model.to(dev)
    X, Y = X.to(dev), Y.to(dev)

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), Y).backward()

    t_plain = timeit(plain, dev, reps)
    print(f"\n== {name}  (device {dev}, plain forward+backward {t_plain * 1e3:.2f} ms)")
    rows = []
    for method, bp_ext in methods:
        acc = H.HessianAccumulator(model, loss_fn, method, seed=0)
        t_plain, t_pc = paired(plain, lambda: acc.update(X, Y), dev, reps)
        t_bp = None
        if backpack is not None and bp_ext is not None:
            # extended copies: BackPACK's hooks must not slow the plain step or popcomp's
            bmodel, bloss = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))

            def bp():
                bmodel.zero_grad(set_to_none=True)
                with backpack(bp_ext()):
                    bloss(bmodel(X), Y).backward()

            try:
                # BackPACK is very slow on long sequences: time it once after one warm-up there
                if slow_peer:
                    t_bp = timeit(bp, dev, 1, warmup=1)
                else:
                    t_plain2, t_bp = paired(plain, bp, dev, reps)
                    t_bp *= t_plain / t_plain2  # express against the plain time of this row
            except Exception as e:  # noqa: BLE001
                print(f"   BackPACK {bp_ext.__name__} failed: {type(e).__name__}: {e}")
        line = f"   {method:<8} popcomp {t_pc * 1e3:9.2f} ms  {t_pc / t_plain:6.2f}x plain"
        if t_bp is not None:
            line += (f" | BackPACK {bp_ext.__name__} {t_bp * 1e3:9.2f} ms {t_bp / t_plain:6.2f}x plain"
                     f" | popcomp speed-up over BackPACK {t_bp / t_pc:5.2f}x")
        print(line)
        rows.append((method, t_pc / t_plain, None if t_bp is None else t_bp / t_plain))
    return rows


def bench_memory(dev):
    """Peak extra memory of the fused op on sequences: independent of B and T (CUDA only)."""
    if dev.type != "cuda":
        print("   peak extra memory: measured on CUDA only (the CPU kernel uses two 64x256 and two "
              "64x64 / 64x256 float tiles per thread by construction, whatever B and T)")
        return
    for B, T in [(8, 256), (32, 1024)]:
        g = torch.randn(B, 1, T, 512, device=dev)
        x = torch.randn(B, T, 512, device=dev)
        acc = torch.zeros(512, 512, device=dev)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.ops.popcomp.sumsq_outer_acc(acc, g, x)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated(dev) - base
        print(f"   fused op B={B} T={T}: peak extra memory {extra} bytes (acc itself {acc.numel() * 4})")


def bench_quantize(reps):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4096, 4096))
    h = {"0.weight": torch.rand(4096, 4096)}
    cfg = popcomp.PalettizeConfig(bits=4, granularity="per_channel")
    ts = []
    for _ in range(reps):
        m = nn.Sequential(nn.Linear(4096, 4096))
        m[0].weight.data.copy_(lin[0].weight)
        t = time.perf_counter()
        popcomp.quantize_(m, cfg, hessian=h)
        ts.append(time.perf_counter() - t)
    print(f"\n== quantize_ Linear 4096x4096, per_channel, 4 bits, Hessian mapping (CPU, "
          f"{torch.get_num_threads()} threads): median {statistics.median(ts):.3f} s, "
          f"min {min(ts):.3f} s over {reps}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--skip-quantize", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    reps = 3 if args.quick else args.reps
    dev = torch.device(args.device)
    torch.manual_seed(0)
    print(f"popcomp {popcomp.__version__}, torch {torch.__version__}, backends {popcomp.backends()}")
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}")
    if backpack is None:
        print("BackPACK not installed (pip install backpack-for-pytorch): no peer numbers")
    ce = nn.CrossEntropyLoss()
    methods = [("fisher", SumGradSquared if backpack else None),
               ("ggn", DiagGGNExact if backpack else None),
               ("ggn_mc", DiagGGNMC if backpack else None)]
    for sizes in ([784, 300, 100, 10], [1024, 1024, 1024, 10]):
        X = torch.randn(256, sizes[0])
        Y = torch.randint(0, 10, (256,))
        bench_case(f"MLP {'-'.join(map(str, sizes))}, batch 256, CE", mlp(sizes), ce, X, Y, dev, reps,
                   methods)
    # the modules BackPACK supports that popcomp added (issue 14): BatchNorm2d, Conv3d,
    # ConvTranspose2d, in eval mode (running statistics), through the generic path
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16 * 15 * 15, 10)).eval()
    vol = nn.Sequential(nn.Conv3d(2, 8, 3), nn.ReLU(), nn.Conv3d(8, 8, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 5 ** 3, 10)).eval()
    up = nn.Sequential(nn.ConvTranspose2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                       nn.Linear(8 * 17 * 17, 10)).eval()
    for name, model, X in (("CNN with BatchNorm2d, 3x32x32, batch 64, CE", cnn, torch.randn(64, 3, 32, 32)),
                           ("Conv3d, 2x14x14x14, batch 32, CE", vol, torch.randn(32, 2, 14, 14, 14)),
                           ("ConvTranspose2d, 8x8x8, batch 64, CE", up, torch.randn(64, 8, 8, 8))):
        try:
            H.HessianAccumulator(model, ce, "fisher")
        except ValueError as e:  # an older popcomp (for before/after comparisons)
            print(f"\n== {name}: not supported ({str(e)[:60]}...)")
            continue
        bench_case(name, model, ce, X, torch.randint(0, 10, (X.shape[0],)), dev, reps, methods[:2])
    X = torch.randn(8, 256, 512)
    Y = torch.randn(8, 256, 512)
    bench_case("Linear 512->512 on sequences B=8 T=256, MSE", nn.Sequential(nn.Linear(512, 512)),
               nn.MSELoss(), X, Y, dev, reps, [("fisher", SumGradSquared if backpack else None)],
               slow_peer=True)
    bench_memory(dev)
    if not args.skip_quantize:
        bench_quantize(3 if args.quick else 5)


if __name__ == "__main__":
    main()
