"""Speed of popcomp.kmeans1d against its peers, measured on this machine in this run.

Prints ratios (never absolute claims) for the targets of the K-means issue:
  * n = 1e6 distinct fp32 values, k = 16, random positive weights:
      exact  >= 20x faster than ckwrap.ckmeans at equal cost (1e-8 rel., from the labels);
      lloyd  <= 2x np.sort of the same array, >= 20x faster than sklearn KMeans(n_init=1)
             with sample_weight, at a cost no higher than sklearn's;
  * n = 1e7 bfloat16, k = 16, exact <= 3x np.sort of the same values as fp32;
  * per-row 4096 x 4096 fp16, k = 16: exact <= 2 s, lloyd <= 0.5 s (ckwrap row by row as peer);
  * with a CUDA device: the per-row problem <= 20 ms, n = 1e8 single problem <= 100 ms.

    python bench/bench_kmeans.py [--quick] [--threads N] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import popcomp


def timeit(fn, repeat=3, sync=False):
    best, out = float("inf"), None
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def cost_from_labels(x, w, labels):
    """Objective of a labelling with each center at its cluster's weighted mean (float64)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    lab = np.asarray(labels).astype(np.int64).ravel()
    lab = np.unique(lab, return_inverse=True)[1]
    H = np.bincount(lab, w)
    S = np.bincount(lab, w * x)
    m = np.where(H > 0, S / np.where(H > 0, H, 1), 0)
    return float(np.sum(w * (x - m[lab]) ** 2))


ROWS = []


def report(name, ours, peer, peer_name, target, ok, note=""):
    ratio = peer / ours if ours > 0 else float("inf")
    ROWS.append((name, f"{ours * 1e3:.1f} ms", peer_name, f"{peer * 1e3:.1f} ms" if peer else "-",
                 f"{ratio:.2f}x" if peer else "-", target, "PASS" if ok else "FAIL", note))
    print(f"{name:<42} ours {ours * 1e3:9.1f} ms | {peer_name:<28} {peer * 1e3:9.1f} ms | "
          f"peer/ours {ratio:7.2f}x | target {target:<26} {'PASS' if ok else 'FAIL'} {note}")


def bench_single(n, quick):
    rng = np.random.default_rng(0)
    x = np.unique(rng.standard_normal(int(n * 1.01)).astype(np.float32))
    x = rng.permutation(x)[:n]
    w = (rng.random(n) + 0.05).astype(np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    t_sort, _ = timeit(lambda: np.sort(x))
    t_ex, r_ex = timeit(lambda: popcomp.kmeans1d(xt, 16, wt, method="exact"))
    c_ex = cost_from_labels(x, w, r_ex.labels.numpy())
    try:
        import ckwrap

        t_ck, r_ck = timeit(lambda: ckwrap.ckmeans(x.astype(np.float64), 16, weights=w.astype(np.float64)), repeat=1)
        c_ck = cost_from_labels(x, w, r_ck.labels)
        same = abs(c_ex - c_ck) <= 1e-8 * c_ck
        report(f"exact n={n:.0e} fp32 k=16", t_ex, t_ck, "ckwrap.ckmeans", ">= 20x faster, equal cost",
               t_ck / t_ex >= 20 and same, f"cost ours {c_ex:.10g} ckwrap {c_ck:.10g}")
    except ImportError:
        print("ckwrap not installed: pip install ckwrap")
    t_ll, r_ll = timeit(lambda: popcomp.kmeans1d(xt, 16, wt, method="lloyd", seed=0))
    c_ll = cost_from_labels(x, w, r_ll.labels.numpy())
    report(f"lloyd n={n:.0e} fp32 k=16", t_ll, t_sort, "np.sort", "<= 2x np.sort time",
           t_ll <= 2 * t_sort, f"iters {int(r_ll.n_iter)}")
    try:
        from sklearn.cluster import KMeans

        km = KMeans(16, n_init=1, random_state=0)
        t_sk, fit = timeit(lambda: km.fit(x.reshape(-1, 1).astype(np.float64), sample_weight=w), repeat=1)
        c_sk = cost_from_labels(x, w, fit.labels_)
        report(f"lloyd n={n:.0e} fp32 k=16", t_ll, t_sk, "sklearn KMeans(n_init=1)",
               ">= 20x faster, cost <= sklearn", t_sk / t_ll >= 20 and c_ll <= c_sk * (1 + 1e-9),
               f"cost ours {c_ll:.8g} sklearn {c_sk:.8g}")
    except ImportError:
        print("scikit-learn not installed: pip install scikit-learn")


def bench_bf16(n):
    x = torch.randn(n).to(torch.bfloat16)
    xf = x.float().numpy()
    t_sort, _ = timeit(lambda: np.sort(xf), repeat=2)
    t_ex, _ = timeit(lambda: popcomp.kmeans1d(x, 16, method="exact"), repeat=2)
    report(f"exact n={n:.0e} bf16 k=16", t_ex, t_sort, "np.sort (fp32 copy)", "<= 3x np.sort time",
           t_ex <= 3 * t_sort)


def bench_rows(rows, n, quick):
    X = torch.randn(rows, n).half()
    t_ex, r = timeit(lambda: popcomp.kmeans1d(X, 16, method="exact"), repeat=1)
    t_ll, _ = timeit(lambda: popcomp.kmeans1d(X, 16, method="lloyd"), repeat=1)
    t_ck = 0.0
    try:
        import ckwrap

        sub = 64 if quick else 256
        Xd = X[:sub].double().numpy()
        t0 = time.perf_counter()
        for i in range(sub):
            ckwrap.ckmeans(Xd[i], 16)
        t_ck = (time.perf_counter() - t0) * rows / sub
    except ImportError:
        pass
    scale = (4096 * 4096) / (rows * n)
    report(f"exact per-row {rows}x{n} fp16 k=16", t_ex, t_ck, "ckwrap row by row (extrap.)",
           "<= 2 s (4096x4096)", t_ex * scale <= 2.0)
    report(f"lloyd per-row {rows}x{n} fp16 k=16", t_ll, 0.0, "-", "<= 0.5 s (4096x4096)", t_ll * scale <= 0.5)


def bench_cuda(quick):
    dev = torch.device("cuda")
    X = torch.randn(4096, 4096, device=dev).half()
    popcomp.kmeans1d(X, 16, method="exact")  # warm-up
    for method in ["exact", "lloyd"]:
        t, _ = timeit(lambda: popcomp.kmeans1d(X, 16, method=method), repeat=3, sync=True)
        Xc = X.cpu()
        tc, _ = timeit(lambda: popcomp.kmeans1d(Xc, 16, method=method), repeat=1)
        report(f"CUDA {method} per-row 4096x4096 fp16", t, tc, "popcomp CPU", "<= 20 ms", t <= 0.020)
    n = 10_000_000 if quick else 100_000_000
    x = torch.randn(n, device=dev)
    for method in ["lloyd", "exact"]:
        for dt in [torch.float32, torch.bfloat16]:
            xx = x.to(dt)
            popcomp.kmeans1d(xx, 16, method=method, seed=0)
            t, _ = timeit(lambda: popcomp.kmeans1d(xx, 16, method=method, seed=0), repeat=3, sync=True)
            ts, _ = timeit(lambda: torch.sort(x), repeat=3, sync=True)
            report(f"CUDA {method} n={n:.0e} {str(dt)[6:]} k=16", t, ts, "torch.sort fp32 (same GPU)",
                   "<= 100 ms", t <= 0.100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller problems (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"popcomp {popcomp.__version__} | torch {torch.__version__} | {platform.processor() or platform.machine()} "
          f"| {os.cpu_count()} cpus | threads {popcomp.backends()['cpu']['threads']}")
    print(popcomp.backends())
    bench_single(200_000 if args.quick else 1_000_000, args.quick)
    bench_bf16(1_000_000 if args.quick else 10_000_000)
    bench_rows(512 if args.quick else 4096, 4096, args.quick)
    if popcomp.backends()["cuda"]["usable"]:
        print("device:", torch.cuda.get_device_name())
        bench_cuda(args.quick)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("| case | ours | peer | peer time | peer time / ours | target | result | note |\n|---|---|---|---|---|---|---|---|\n")
            for r in ROWS:
                f.write("| " + " | ".join(r) + " |\n")


if __name__ == "__main__":
    main()
