"""The prepared device check: everything popcomp needs to verify on a GPU, in one call, one table.

Run it first whenever a GPU machine is available (it builds in place, then checks):

    bash bench/gpu_check.sh            # = pip install --no-build-isolation -e . && python bench/gpu_check.py

Checks, each a PASS/FAIL row with its time: the CUDA backend usable exactly when torch sees a
GPU; every CUDA test (``pytest -k cuda``: the CUDA parameter of the ``devices`` fixture);
repeat-run determinism of every op; CUDA-graph capture of every op; K-means on > 500 rows
equal to the CPU; per-row 4096 x 4096 exact (target <= 20 ms) and lloyd; one problem of
n = 1e8 (target <= 100 ms); then the Hessian, covariance/greedy and palettized-matmul benches
on the GPU (their tails printed). The summary is a Markdown table to paste into
``bench/RESULTS.md`` with the device named.

Without a GPU it says so, checks that everything it would run exists, and exits 0 (CI runs it
that way: ``tests/test_gpu_check.py``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
BENCHES = [  # (script, arguments on the GPU)
    ("bench/bench_hessian.py", ["--device", "cuda", "--quick", "--skip-quantize"]),
    ("bench/bench_prune.py", ["--device", "cuda"]),
    ("bench/bench_kmeans.py", ["--quick"]),
    ("bench/bench_palettized.py", ["--device", "cuda", "--quick"]),
]
ROWS: List[Tuple[str, str, str, str]] = []


def row(name: str, ok: Optional[bool], seconds: float, note: str = "") -> None:
    status = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
    ROWS.append((name, status, f"{seconds:.2f} s", note))
    print(f"[{status}] {name} ({seconds:.2f} s) {note}", flush=True)


def check(name: str, fn: Callable[[], Tuple[bool, str]]) -> None:
    t = time.perf_counter()
    try:
        ok, note = fn()
    except Exception as e:  # noqa: BLE001 - a failing check is a row, not the end of the run
        ok, note = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    row(name, ok, time.perf_counter() - t, note)


def run(cmd: List[str], timeout: float) -> Tuple[bool, str]:
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    out = (p.stdout + p.stderr).strip().splitlines()
    print("\n".join("    " + ln for ln in out[-25:]), flush=True)
    return p.returncode == 0, (out[-1][:160] if out else "")


def missing_files() -> List[str]:
    need = [s for s, _ in BENCHES] + ["bench/gpu_check.sh", "tests/conftest.py"]
    return [p for p in need if not (ROOT / p).exists()]


# ---- the checks (need torch + a CUDA device) -------------------------------------------------


def gpu_checks(args) -> None:
    import torch

    import popcomp

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
          f"backends {popcomp.backends()}", flush=True)

    def usable():
        b = popcomp.backends()["cuda"]
        return b["usable"] == torch.cuda.is_available(), f"cuda backend {b}"

    check("CUDA backend usable == torch.cuda.is_available()", usable)
    check("CUDA tests (pytest -k cuda)",
          lambda: run([sys.executable, "-m", "pytest", "-q", "-x", "tests", "-k", "cuda"],
                      timeout=args.test_timeout))

    ops = torch.ops.popcomp
    g = torch.Generator(device="cpu").manual_seed(0)
    xr = torch.randn(600, 1000, generator=g).to(dev)
    wr = torch.rand(600, 1000, generator=g).to(dev)

    def kmeans(method):
        return lambda: ops.kmeans1d(xr, wr, 16, 0.0, method, "quantile", None, 100, 0.0, 0,
                                    "squared")

    gg = torch.randn(8, 1, 64, 256, generator=g).to(dev)
    gx = torch.randn(8, 64, 384, generator=g).to(dev)

    def sumsq():
        acc = torch.zeros(256, 384, device=dev)
        ops.sumsq_outer_acc(acc, gg, gx)
        return (acc,)

    cx = torch.randn(4096, 512, generator=g).to(dev)

    def cov():
        acc = torch.zeros(512, 512, device=dev, dtype=torch.float64)
        cnt = torch.zeros((), dtype=torch.int64, device=dev)
        ops.covariance_accumulate(cx, acc, cnt)
        return (acc, cnt)

    C = (cx.double().T @ cx.double()) / cx.shape[0]
    tau = torch.full((512,), 1e-3, dtype=torch.float64, device=dev)

    def greedy():
        return ops.greedy_select(C, 64, tau, 1.0, None)

    cases = [("kmeans1d exact", kmeans("exact")), ("kmeans1d lloyd", kmeans("lloyd")),
             ("sumsq_outer_acc", sumsq), ("covariance_accumulate", cov), ("greedy_select", greedy)]

    def same(fn):
        def f():
            a, b = fn(), fn()
            sync()
            bad = [i for i, (u, v) in enumerate(zip(a, b)) if not torch.equal(u, v)]
            return not bad, "bit-identical" if not bad else f"outputs {bad} differ between runs"
        return f

    for name, fn in cases:
        check(f"determinism: {name} twice, bit-identical", same(fn))

    def capture(fn):
        def f():
            fn()
            sync()
            graph = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()  # warm-up on the side stream, as torch recommends before capture
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(graph):
                out = fn()
            graph.replay()
            sync()
            ref = fn()
            sync()
            ok = all(torch.equal(u, v) for u, v in zip(out, ref))
            return ok, "captured and replayed" + ("" if ok else ", replay differs from eager")
        return f

    for name, fn in cases:
        check(f"CUDA graph capture: {name}", capture(fn))

    def rows_vs_cpu():
        xs = torch.randn(1000, 512, generator=g)
        a = popcomp.kmeans1d(xs, 8, method="exact")
        b = popcomp.kmeans1d(xs.to(dev), 8, method="exact")
        same_labels = torch.equal(a.labels, b.labels.cpu())
        return same_labels, f"1000 rows: labels {'equal' if same_labels else 'DIFFER'}"

    check("kmeans1d > 500 rows (exact) CUDA == CPU", rows_vs_cpu)

    def vs_cpu(xs, ws=None, method="exact", k=8, exact_labels=True):
        a = popcomp.kmeans1d(xs, k, ws, method=method)
        b1 = popcomp.kmeans1d(xs.to(dev), k, None if ws is None else ws.to(dev), method=method)
        b2 = popcomp.kmeans1d(xs.to(dev), k, None if ws is None else ws.to(dev), method=method)
        rep = all(torch.equal(u, v) for u, v in zip((b1.labels, b1.centers, b1.cost),
                                                    (b2.labels, b2.centers, b2.cost)))
        cost_ok = torch.allclose(a.cost, b1.cost.cpu(), rtol=1e-9, atol=0)
        lab_ok = torch.equal(a.labels, b1.labels.cpu()) or not exact_labels
        ok = rep and cost_ok and lab_ok
        return ok, (f"repeat {'bit-identical' if rep else 'DIFFERS'}, cost rel. diff "
                    f"{float(((a.cost - b1.cost.cpu()).abs() / a.cost.abs().clamp_min(1e-300)).max()):.1e}, "
                    f"labels {'equal' if torch.equal(a.labels, b1.labels.cpu()) else 'differ'}")

    x64 = torch.randn(600, 700, generator=g, dtype=torch.float64)
    w64 = torch.rand(600, 700, generator=g, dtype=torch.float64)
    check("kmeans1d float64 600 rows (two-pass sort), weighted", lambda: vs_cpu(x64, w64))
    check("kmeans1d float64 600 rows (two-pass sort), unweighted", lambda: vs_cpu(x64))
    runs = torch.where(torch.rand(4, 20000, generator=g) < 0.5, torch.zeros(()),
                       torch.randn(4, 20000, generator=g))
    check("kmeans1d runs > 4096 equal values, rows > 4096 distinct (fixed-order sums)",
          lambda: vs_cpu(runs, torch.rand(4, 20000, generator=g), exact_labels=False))

    def chunked():
        old = os.environ.get("POPCOMP_CUDA_DP_BUDGET")
        os.environ["POPCOMP_CUDA_DP_BUDGET"] = "1000000"
        try:
            return vs_cpu(torch.randn(1000, 512, generator=g))
        finally:
            if old is None:
                os.environ.pop("POPCOMP_CUDA_DP_BUDGET")
            else:
                os.environ["POPCOMP_CUDA_DP_BUDGET"] = old

    check("kmeans1d exact DP in row chunks (POPCOMP_CUDA_DP_BUDGET=1e6) == CPU", chunked)
    centers = torch.linspace(-100, 100, 16)
    wide = centers[torch.randint(0, 16, (256, 4096), generator=g)] + 0.01 * torch.randn(
        256, 4096, generator=g)
    check("kmeans1d well-separated clusters (wide DP nodes) == CPU", lambda: vs_cpu(wide, k=16))

    def huge_row_error():
        x = torch.randn(100_000_000, device=dev)
        try:
            popcomp.kmeans1d(x, 256, method="exact")
        except torch.cuda.OutOfMemoryError as e:
            return "method='lloyd'" in str(e), "OutOfMemoryError naming the way out"
        return True, "fitted in memory (no error needed on this device)"

    check("kmeans1d n=1e8 k=256 exact: clear error or success", huge_row_error)

    def compiled_graphs():
        f = torch.compile(lambda t: popcomp.kmeans1d(t, 16, method="lloyd").centers,
                          mode="reduce-overhead", fullgraph=True)
        t = torch.randn(64, 4096, device=dev)
        a, b = f(t), f(t)
        sync()
        return torch.equal(a, b) and torch.equal(a, popcomp.kmeans1d(t, 16, method="lloyd").centers), \
            "torch.compile(mode='reduce-overhead') == eager"

    check("torch.compile reduce-overhead (CUDA graphs): kmeans1d", compiled_graphs)

    def timed(fn, reps=3):
        fn()
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    w = torch.randn(4096, 4096, generator=g).half().to(dev)
    for method, target in (("exact", 0.020), ("lloyd", None)):
        def per_row(method=method, target=target):
            t = timed(lambda: popcomp.kmeans1d(w, 16, method=method))
            ok = True if target is None else t <= target
            return ok, f"{t * 1e3:.1f} ms" + (f" (target <= {target * 1e3:.0f} ms)" if target else "")
        check(f"kmeans1d per-row 4096x4096 fp16 k=16 {method}", per_row)

    def big():
        x = torch.randn(100_000_000, device=dev)
        t = timed(lambda: popcomp.kmeans1d(x, 16, method="exact"), reps=2)
        return t <= 0.100, f"{t * 1e3:.1f} ms (target <= 100 ms)"

    check("kmeans1d n=1e8 fp32 k=16 exact", big)

    for script, extra in BENCHES:
        if (ROOT / script).exists():
            check(f"bench: {script} {' '.join(extra)}",
                  lambda s=script, e=extra: run([sys.executable, s, *e], timeout=args.bench_timeout))
        else:
            row(f"bench: {script}", None, 0.0, "not in this checkout")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-timeout", type=float, default=120.0)
    ap.add_argument("--bench-timeout", type=float, default=40.0)
    args = ap.parse_args(argv)
    missing = missing_files()
    if missing:
        print(f"gpu_check: missing files it would run: {missing}")
        return 1
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        print("gpu_check: no CUDA device here; every file it would run exists; nothing run.")
        return 0
    t0 = time.perf_counter()
    gpu_checks(args)
    print(f"\n## GPU check ({time.perf_counter() - t0:.0f} s)\n")
    print("| check | result | time | note |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    return 0 if all(r[1] != "FAIL" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
