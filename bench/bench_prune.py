"""Spectral-pruning kernels vs pure torch (ratios from one run; not a timed test).

  python bench/bench_prune.py                 # the issue's sizes (CPU, and CUDA when usable)
  python bench/bench_prune.py --m 1024 --k 512 --N 8192 --cov-m 1024   # quick run

1. greedy selection (float32, m x m covariance, k steps): popcomp.greedy_select vs a
   vectorized pure-torch implementation of the same residual rank-one algorithm (R updated
   in place with addr_, gains from column norms); Z = None, theta = 1 (M = I) unless --theta.
2. covariance accumulation of bfloat16 activations (N x m): popcomp.covariance_accumulate
   (reads bf16 in place, accumulates in float32) vs ``X.float().T @ X``.
On CUDA the greedy time is also compared with the floor of k passes over the m x m residual
at the measured device memory bandwidth.
"""
from __future__ import annotations

import argparse
import time

import torch

import popcomp


def torch_greedy(S, k, tau, M=None):
    """Vectorized pure-torch greedy with explicit residual rank-one updates."""
    m = S.shape[0]
    R = S.clone()
    P = None if M is None else M @ R
    chosen = torch.zeros(m, dtype=torch.bool, device=S.device)
    idx = torch.empty(k, dtype=torch.int64, device=S.device)
    neg = torch.tensor(-1.0, dtype=S.dtype, device=S.device)
    for t in range(k):
        num = torch.linalg.vector_norm(R, dim=0).square() if P is None else (R * P).sum(0)
        d = R.diagonal() + tau
        gain = torch.where(chosen, neg, num / d)
        j = torch.argmax(gain)
        idx[t] = j
        chosen[j] = True
        inv = -1.0 / d[j]
        r = R[:, j].clone()
        if P is not None:
            pr = P[:, j].clone()
            P.sub_(torch.outer(pr * (-inv), r))
        R.sub_(torch.outer(r * (-inv), r)) if S.is_cuda else R.addr_(r, r, alpha=float(inv))
    return idx


def timeit(fn, sync, reps=1, warm=False):
    """(seconds per call, last result). The large problems run once, without warm-up (the
    kernels are warmed up on a small problem first)."""
    if warm:
        fn()
        sync()
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn()
    sync()
    return (time.perf_counter() - t0) / reps, out


def bench_device(dev, a):
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(f"== device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} "
          f"(threads {torch.get_num_threads()})")
    g = torch.Generator().manual_seed(0)
    m, k = a.m, a.k
    if a.only != "cov":
        bench_greedy(dev, a, g, sync)
    if a.only != "greedy":
        bench_cov(dev, a, g, sync)


def bench_greedy(dev, a, g, sync):
    m, k = a.m, a.k
    X = torch.randn(2 * m, m, generator=g) * torch.logspace(0, -3, m)
    S = (X.T @ X / (2 * m)).to(dev)
    S = 0.5 * (S + S.T)
    tau = torch.full((m,), 1e-6 * float(S.diagonal().sum()), device=dev)
    Z = None
    M = None
    if a.theta < 1.0:
        Z = torch.randn(a.p, m, generator=g).to(dev) / m**0.5
        M = a.theta * torch.eye(m, device=dev) + (1 - a.theta) * Z.T @ Z
    # warm-up on a small problem (lazy init, allocator)
    s_small = S[:64, :64].contiguous()
    popcomp.greedy_select(s_small, 8, tau=tau[:64].double())
    torch_greedy(s_small, 8, tau[:64])
    ours, res = timeit(lambda: popcomp.greedy_select(S, k, tau=tau.double(), theta=a.theta, Z=Z), sync)
    print(f"greedy m={m} k={k} f32 theta={a.theta}: popcomp {ours:.3f} s")
    if not a.skip_torch:
        base, i2 = timeit(lambda: torch_greedy(S, k, tau, M), sync)
        i1 = res.indices
        agree = int((i1[: min(k, 64)] == i2[: min(k, 64)]).sum())
        print(f"  torch rank-one {base:.3f} s  -> ratio popcomp/torch = {ours / base:.3f} "
              f"(first {min(k, 64)} picks agree: {agree}/{min(k, 64)})")
    if dev == "cuda":
        buf = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        t, _ = timeit(lambda: buf.clone(), sync, reps=10, warm=True)
        bw = 2 * buf.numel() / t
        floor = k * m * m * 4 / bw
        print(f"  memory bandwidth {bw / 1e9:.0f} GB/s; floor (k passes over R) {floor * 1e3:.1f} ms; "
              f"popcomp / floor = {ours / floor:.2f}")


def bench_cov(dev, a, g, sync):
    N, cm = a.N, a.cov_m
    Xb = torch.randn(N, cm, generator=g).to(torch.bfloat16).to(dev)
    acc = torch.zeros(cm, cm, device=dev)
    cnt = torch.zeros((), dtype=torch.int64, device=dev)

    def ours_cov():
        acc.zero_()
        cnt.zero_()
        popcomp.covariance_accumulate(Xb, acc, cnt)

    def torch_cov():
        Xf = Xb.float()
        return Xf.T @ Xf

    popcomp.covariance_accumulate(Xb[:512, :128])  # warm-up
    t_ours, _ = timeit(ours_cov, sync)
    Xb[:512, :128].float().T @ Xb[:512, :128].float()
    t_torch, ref = timeit(torch_cov, sync)
    err = float((acc - ref).abs().max() / ref.abs().max())
    del ref
    print(f"covariance bf16 N={N} m={cm}: popcomp {t_ours:.3f} s, X.float().T @ X {t_torch:.3f} s "
          f"-> ratio popcomp/torch = {t_ours / t_torch:.3f} (max rel diff {err:.1e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--theta", type=float, default=1.0)
    ap.add_argument("--p", type=int, default=512, help="rows of Z when theta < 1")
    ap.add_argument("--N", type=int, default=65536)
    ap.add_argument("--cov-m", type=int, default=4096)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--only", choices=["greedy", "cov"], default=None)
    a = ap.parse_args()
    print(popcomp.backends())
    devs = ["cpu"] if a.device == "cpu" else (["cuda"] if a.device == "cuda" else ["cpu"])
    if a.device == "all" and popcomp.backends()["cuda"]["usable"]:
        devs.append("cuda")
    for dev in devs:
        bench_device(dev, a)


if __name__ == "__main__":
    main()
