"""Regression tests of issue 14: crashes (run in a subprocess), silent wrong results on badly
scaled data, the K-means workspace bound, and clear errors for bad arguments."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import popcomp
from popcomp.ops.backends.reference.greedy_select import greedy_select_reference
from popcomp.spectral import covariance_accumulate, greedy_select
from oracles import kmeans_brute_force_cost

LINUX = sys.platform.startswith("linux")


def run_py(code: str, env=None, timeout=300):
    """Run ``code`` in a fresh interpreter; returns the CompletedProcess (never raises)."""
    e = dict(os.environ, POPCOMP_NO_PROGRESS="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=e, timeout=timeout)


# ---- crashes --------------------------------------------------------------------------------

# Raises the address-space limit to what the process maps now plus `extra` bytes: allocations
# beyond it fail (std::bad_alloc) without touching memory.
_LIMIT = """
import os, resource, torch, popcomp
popcomp.kmeans1d(torch.randn(4, 1000), 8)  # the thread pool is up
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (vm + {extra}, hard))
"""


@pytest.mark.skipif(not LINUX, reason="needs RLIMIT_AS (Linux)")
def test_bad_alloc_in_parallel_region_is_a_memory_error():
    # rows >= threads: the rows are solved in one OpenMP region; each thread's k-sized scratch
    # (~700 MB at k = 2^23) does not fit, the output (128 MB) does
    r = run_py(_LIMIT.format(extra=600 << 20) + """
try:
    popcomp.kmeans1d(torch.randn(2, 10), 2**23)
    print("NO ERROR")
except MemoryError:
    print("MEMORYERROR")
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
x = torch.tensor([[0., 1., 5., 6.], [1., 2., 8., 9.]])
print("COST", popcomp.kmeans1d(x, 2, method="exact").cost.tolist())
""", env={"POPCOMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert "MEMORYERROR" in r.stdout
    assert "COST [1.0, 1.0]" in r.stdout  # the process and its workspaces still work


@pytest.mark.skipif(not LINUX, reason="needs RLIMIT_AS (Linux)")
def test_exact_table_sized_against_memory():
    r = run_py(_LIMIT.format(extra=1 << 30) + """
try:
    popcomp.kmeans1d(torch.randn(2, 200_000, dtype=torch.float64), 5000, method="exact")
    print("NO ERROR")
except ValueError as e:
    print("VALUEERROR", e)
""", env={"POPCOMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert "VALUEERROR" in r.stdout
    assert "k = 5000" in r.stdout and "n = 200000" in r.stdout and "lloyd" in r.stdout


def test_huge_thread_count_is_clamped():
    r = run_py("""
import warnings, torch, popcomp
from popcomp._backend import num_threads, MAX_THREADS
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    n = num_threads()
assert 1 <= n <= MAX_THREADS, n
assert any("POPCOMP_NUM_THREADS" in str(x.message) for x in w)
res = popcomp.kmeans1d(torch.randn(64, 2000), 4)
acc, cnt = popcomp.spectral.covariance_accumulate(torch.randn(3000, 8))
print("OK", n, bool(torch.isfinite(res.cost).all()), int(cnt))
""", env={"POPCOMP_NUM_THREADS": "100000"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK") and r.stdout.split()[2:] == ["True", "3000"]


@pytest.mark.parametrize("argv, flag", [
    (["demo", "--threads", "100000"], "--threads"),
    (["demo", "--epochs", "10000000000"], "--epochs"),
    (["repro", "linreg", "--d", "100000000000"], "--d"),
    (["repro", "linreg", "--trials", "10000000000"], "--trials"),
    (["repro", "nn", "--models", "100000000"], "--models"),
    (["repro", "bounds", "--hidden", "10000000,3"], "--hidden"),
])
def test_cli_numbers_too_large_one_line_exit_2(argv, flag):
    r = subprocess.run([sys.executable, "-m", "popcomp", *argv], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, POPCOMP_NO_PROGRESS="1"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr


def test_thread_cap_values():
    from popcomp._backend import MAX_THREADS, _thread_cap

    assert 1 <= _thread_cap() <= MAX_THREADS


# ---- K-means on badly scaled data: brute force ----------------------------------------------
# (on every device: the CUDA kernels rescale a badly scaled row as the CPU solver does)

@pytest.mark.parametrize("wscale", [1e200, 1e-200, 1e300, 1e-300, 2.0**-1070])
@pytest.mark.parametrize("trial", range(3))
def test_exact_extreme_weight_scales_brute_force(wscale, trial, devices):
    g = torch.Generator().manual_seed(trial)
    x = torch.randn(9, generator=g, dtype=torch.float64)
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    ws = w * wscale
    w = ws / wscale  # (subnormal weights hold fewer bits)
    ref = kmeans_brute_force_cost(x.tolist(), w.tolist(), 3)
    x, w, ws = x.to(devices), w.to(devices), ws.to(devices)
    r = popcomp.kmeans1d(x, 3, ws, method="exact")
    assert torch.isfinite(r.centers).all()
    # the cost scales with the weights; the optimal centers do not
    # (a cost in the subnormal range holds fewer bits)
    assert float(r.cost) == pytest.approx(ref * wscale, rel=1e-9, abs=4 * 2.0**-1074)
    r1 = popcomp.kmeans1d(x, 3, w, method="exact")
    torch.testing.assert_close(r.centers, r1.centers, rtol=1e-12, atol=0)
    assert torch.equal(r.labels, r1.labels)


def test_exact_weights_near_float64_max(devices):
    x = torch.randn(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(devices)
    r = popcomp.kmeans1d(x, 4, torch.full_like(x, 1e308), method="exact")
    r1 = popcomp.kmeans1d(x, 4, method="exact")
    assert torch.isfinite(r.centers).all()
    torch.testing.assert_close(r.centers, r1.centers, rtol=1e-12, atol=0)
    # the true cost is 1e308 x the unit-weight one: finite when that is below the range
    true = 1e308 * float(r1.cost)
    assert float(r.cost) == pytest.approx(true, rel=1e-9) if math.isfinite(true) else float(r.cost) == math.inf


@pytest.mark.parametrize("vscale", [1e150, 1e-150, 1e-300, 2.0**-1060])
@pytest.mark.parametrize("trial", range(3))
def test_exact_extreme_value_scales_brute_force(vscale, trial, devices):
    g = torch.Generator().manual_seed(10 + trial)
    x = torch.randn(9, generator=g, dtype=torch.float64) * vscale
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    ref = kmeans_brute_force_cost(x.tolist(), w.tolist(), 3)
    x, w = x.to(devices), w.to(devices)
    r = popcomp.kmeans1d(x, 3, w, method="exact")
    assert float(r.cost) == pytest.approx(ref, rel=1e-9, abs=0)
    # every value lands on its nearest center
    d = (x[:, None] - r.centers[None, :]).abs()
    assert torch.equal(d.argmin(1).int(), r.labels)


def test_exact_values_spanning_the_range(devices):
    x = torch.tensor([1e200, -1e200, 0.0, 5.0], dtype=torch.float64, device=devices)
    r = popcomp.kmeans1d(x, 3, method="exact")
    assert float(r.cost) == pytest.approx(12.5, rel=1e-15)
    assert r.centers.tolist() == [-1e200, 2.5, 1e200]
    assert r.labels.tolist() == [2, 0, 1, 1]
    x = torch.tensor([-1.5e308, 1.5e308, 1e-300, 3e-300], dtype=torch.float64, device=devices)
    r = popcomp.kmeans1d(x, 3, method="exact")
    assert r.centers[[0, 2]].tolist() == [-1.5e308, 1.5e308]
    assert float(r.centers[1]) == pytest.approx(2e-300, rel=1e-15)
    assert r.labels.tolist() == [0, 2, 1, 1]
    assert float(r.cost) == 0.0  # 2e-600 underflows


@pytest.mark.parametrize("method", ["exact", "lloyd"])
@pytest.mark.parametrize("diameter", ["squared", "linear"])
def test_huge_beta_collapses_with_finite_cost(method, diameter, devices):
    x = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(devices)
    r = popcomp.kmeans1d(x, 4, beta=1e308, method=method, diameter=diameter, seed=0)
    assert torch.isfinite(r.cost)
    assert float(r.centers.max() - r.centers.min()) == 0.0
    m = float(r.centers[0])
    assert float(r.cost) == pytest.approx(float(((x - m) ** 2).sum()), rel=1e-12)
    assert float(r.cost) >= float(((x - x.mean()) ** 2).sum()) * (1 - 1e-12)


def test_lloyd_invariant_to_power_of_two_scales(devices):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 500, generator=g, dtype=torch.float64).to(devices)
    w = torch.rand(3, 500, generator=g, dtype=torch.float64).to(devices)
    r = popcomp.kmeans1d(x, 5, w, method="lloyd", init="linear")
    s = 2.0 ** 700
    rs = popcomp.kmeans1d(x * s, 5, w / s, method="lloyd", init="linear")
    assert torch.equal(r.labels, rs.labels)
    torch.testing.assert_close(rs.centers / s, r.centers, rtol=1e-12, atol=0)
    torch.testing.assert_close(rs.cost / s, r.cost, rtol=1e-12, atol=0)


def _badly_scaled_rows(n, seed):
    """Rows of n float64 values and weights: plain ones and ones far outside [2^-100, 2^100]
    (values, weights or both), so that one call mixes scaled and unscaled rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, n, generator=g, dtype=torch.float64)
    w = torch.rand(6, n, generator=g, dtype=torch.float64) + 0.25
    x[1] *= 1e150
    w[2] *= 1e-200
    x[3] *= 1e-150
    w[3] *= 1e250
    x[4] *= 1e-120
    w[4] *= 1e120
    x[5] *= 2.0**-480
    return x, w


@pytest.mark.parametrize("n", [40, 5000])  # 5000 > 4096: the CUDA cost sums chunks of values
@pytest.mark.parametrize("method, beta, init", [("exact", 0.0, None), ("exact", 1e-3, None),
                                                ("lloyd", 0.0, "linear"), ("lloyd", 0.0, "given"),
                                                ("lloyd", 2.0, "quantile"), ("lloyd", 0.0, "kmeans++")])
def test_badly_scaled_rows_cpu_equals_cuda(n, method, beta, init, cuda_device):
    x, w = _badly_scaled_rows(n, 7)
    k = 5
    kw = dict(method=method, beta=beta, seed=0)
    if init == "given":
        kw["init"] = torch.sort(x[:, :: n // k][:, :k], dim=1).values
    elif init is not None:
        kw["init"] = init
    rc = popcomp.kmeans1d(x, k, w, **kw)
    if init == "given":
        kw["init"] = kw["init"].to(cuda_device)
    rg = popcomp.kmeans1d(x.to(cuda_device), k, w.to(cuda_device), **kw)
    assert torch.isfinite(rg.centers).all() and torch.isfinite(rg.cost).all()
    torch.testing.assert_close(rg.centers.cpu(), rc.centers, rtol=1e-9, atol=0)
    torch.testing.assert_close(rg.cost.cpu(), rc.cost, rtol=1e-8, atol=0)
    same = (rg.labels.cpu() == rc.labels).double().mean().item()
    assert same >= (1.0 if n <= 4096 else 0.9999), same
    assert torch.equal(rg.n_iter.cpu(), rc.n_iter)


@pytest.mark.parametrize("k", [3, 8])  # 8 >= the 6 distinct values: every value its own center
def test_badly_scaled_few_values_cpu_equals_cuda(k, cuda_device):
    x = torch.tensor([[1e200, -1e200, 0.0, 5.0, 5.0, 7.0], [1e-300, 3e-300, 2e-300, 1e-300, 0.0, 4e-300]],
                     dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1e250, 1.0, 1e-250, 3.0, 2.0, 1.0]],
                     dtype=torch.float64)
    for method in ("exact", "lloyd"):
        rc = popcomp.kmeans1d(x, k, w, method=method, seed=0)
        rg = popcomp.kmeans1d(x.to(cuda_device), k, w.to(cuda_device), method=method, seed=0)
        torch.testing.assert_close(rg.centers.cpu(), rc.centers, rtol=1e-12, atol=0)
        assert torch.equal(rg.labels.cpu(), rc.labels)
        torch.testing.assert_close(rg.cost.cpu(), rc.cost, rtol=1e-12, atol=0)


# ---- the workspace bound --------------------------------------------------------------------

@pytest.mark.skipif(not LINUX, reason="reads /proc/self/statm")
def test_workspace_of_huge_k_is_released():
    r = run_py("""
import os, torch, popcomp
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
popcomp.kmeans1d(torch.randn(10), 3)
before = rss()
res = popcomp.kmeans1d(torch.randn(10), 2**24)
del res
print("GROWTH_MB", (rss() - before) >> 20)
""", env={"POPCOMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split("GROWTH_MB")[1])
    assert growth < 300, growth  # the documented bound is 256 MB per thread


# ---- greedy_select on badly scaled covariances ----------------------------------------------

def _cov(m=12, dtype=torch.float64, seed=0):
    X = torch.randn(200, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (X.T @ X / 200).to(dtype)


@pytest.mark.parametrize("scale", [2.0**600, 1e170, 1e-305, 2.0**-1000])
def test_greedy_invariant_to_cov_scale(scale):
    S = _cov()
    Z = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r0 = greedy_select(S, 5, tau=1e-3, theta=0.5, Z=Z)
    r = greedy_select(S * scale, 5, tau=1e-3 * scale, theta=0.5, Z=Z)
    assert torch.equal(r.indices, r0.indices)
    torch.testing.assert_close(r.objective / scale, r0.objective, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype, zscale", [(torch.float32, 1e30), (torch.float64, 1e200),
                                           (torch.float64, 1e-200), (torch.float32, 1e-30)])
def test_greedy_z_scale_finite_objective(dtype, zscale):
    S = _cov(dtype=dtype)
    Z = torch.randn(5, 12, generator=torch.Generator().manual_seed(2), dtype=dtype)
    r0 = greedy_select(S, 5, tau=1e-3, theta=0.0, Z=Z)
    r = greedy_select(S, 5, tau=1e-3, theta=0.0, Z=Z * zscale)
    assert torch.equal(r.indices, r0.indices)
    true = r0.objective * zscale * zscale
    if torch.isfinite(true).all() and (true > 1e-290).all():
        torch.testing.assert_close(r.objective, true, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=0)
    # with theta in (0, 1) the objective is never NaN or -inf and does not increase
    r2 = greedy_select(S, 5, tau=1e-3, theta=0.5, Z=Z * zscale)
    assert not torch.isnan(r2.objective).any() and (r2.objective > -math.inf).all()
    assert (r2.objective[1:] <= r2.objective[:-1]).all()


def test_greedy_z_scale_matches_float64_reference():
    S = _cov()
    Z = torch.randn(5, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e100
    tau = torch.full((12,), 1e-3, dtype=torch.float64)
    r = greedy_select(S, 6, tau=tau, theta=0.3, Z=Z)
    idx, obj = greedy_select_reference(S, 6, tau, 0.3, Z)
    assert torch.equal(r.indices, idx)
    torch.testing.assert_close(r.objective, obj, rtol=1e-9, atol=0)


# ---- clear errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [({"max_iter": 2**31}, "max_iter"), ({"k": 2**31}, "k must")])
def test_kmeans_int32_bounds(kw, match):
    args = {"k": 3, **kw}
    with pytest.raises(ValueError, match=match):
        popcomp.kmeans1d(torch.randn(10), **args)


def test_meta_tensors_refused():
    with pytest.raises(ValueError, match="meta"):
        popcomp.kmeans1d(torch.randn(10, device="meta"), 3)
    with pytest.raises(ValueError, match="meta"):
        covariance_accumulate(torch.randn(4, 3, device="meta"))


def test_covariance_accumulate_argument_errors():
    with pytest.raises(ValueError, match="sample dimension"):
        covariance_accumulate(torch.tensor(1.0))
    with pytest.raises(TypeError, match="channel_dim"):
        covariance_accumulate(torch.randn(2, 3, 4), channel_dim="1")
    for cd in (3, -4, 7):
        with pytest.raises(ValueError, match="channel_dim must be in -3..2"):
            covariance_accumulate(torch.randn(2, 3, 4), channel_dim=cd)


def test_quantize_names_the_layer():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        m[2].weight[1, 2] = float("nan")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"weight of layer '2' contains NaN or Inf"):
        popcomp.quantize_(m, popcomp.PalettizeConfig(bits=2))
    after = m.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_quantize_empty_linear_is_a_clear_error():
    m = torch.nn.Sequential(torch.nn.Linear(0, 3))
    with pytest.raises(ValueError, match="layer '0'"):
        popcomp.quantize_(m, popcomp.PalettizeConfig(bits=2))


def test_save_path_none(tmp_path):
    os.chdir(tmp_path)
    with pytest.raises(TypeError, match="path"):
        popcomp.save(torch.nn.Linear(2, 2), None)
    assert not (tmp_path / "None").exists()


def test_safetensors_is_a_core_dependency():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "pyproject.toml")).read()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "safetensors" in deps


def test_missing_matplotlib_is_one_line():
    r = run_py("""
import sys
sys.modules["matplotlib"] = None  # as if not installed
from popcomp.cli import main
sys.exit(main(["demo", "--quick"]))
""")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "matplotlib" in lines[0] and "popcomp[demo]" in lines[0]
