"""`popcomp repro <name> --quick` and `popcomp demo --quick` produce their files with finite
values; user mistakes exit non-zero with a message and no traceback."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from popcomp.cli import main, resolve_args  # noqa: E402
from popcomp.experiments._common import UserError  # noqa: E402

# files each experiment must write, and per CSV the columns that must be finite in every row
EXPECT = {
    "linreg": {
        "png": ["fig2_generalization.png", "fig3_distortion.png", "fig4_population_risk.png"],
        "csv": {"linreg.csv": ["gen_mean", "gen_se", "distortion_mean", "DR_bound", "emp_risk_mean",
                               "pop_risk_mean", "pop_risk_se", "lemma3_exact"]},
    },
    "nn": {
        "png": ["fig5_hw_vs_drhw.png", "fig7_beta_sweep.png"],
        "csv": {"nn_hw_vs_drhw.csv": ["ratio_mean", "emp_risk_mean", "pop_risk_mean", "gen_error_mean",
                                      "gen_error_se", "test_acc_mean"],
                "nn_beta_sweep.csv": ["ratio_mean", "emp_risk_mean", "pop_risk_mean", "gen_error_mean"]},
    },
    "spectral": {
        "png": ["fig1a_eigenvalues.png", "fig1b_error_vs_width.png", "fig2_accuracy_lambda_theta.png"],
        "csv": {"spectral_eigen.csv": ["dof_lambda_1e-6", "dof_lambda_1e-3"],
                "spectral_error_vs_width.csv": ["rel_error", "test_acc"],
                "spectral_accuracy.csv": ["param_ratio", "test_acc"]},
    },
    "bounds": {
        "png": ["bounds_effective_params.png"],
        "csv": {"bounds_layers.csv": ["spectral_norm", "frobenius_norm", "stable_rank", "layer_cushion_max",
                                      "min_interlayer_cushion_min"],
                "bounds_effective_params.csv": ["value"],
                "bounds_table1.csv": ["original", "arora", "spec_prun"],
                "bounds_suzuki_thm2.csv": ["bias_proxy_sum_sqrt_lambda", "delta2"]},
    },
    "demo": {
        "png": ["demo.png"],
        "csv": {"demo.csv": ["size_bytes", "ratio", "train_loss", "train_acc", "test_loss", "test_acc",
                             "gen_gap"]},
    },
}


def _check(out, name):
    exp = EXPECT[name]
    for f in exp["png"]:
        p = os.path.join(out, f)
        assert os.path.getsize(p) > 1000, p
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    for f, cols in exp["csv"].items():
        with open(os.path.join(out, f)) as fh:
            rows = list(csv.DictReader(fh))
        assert rows, f
        for r in rows:
            for c in cols:
                assert math.isfinite(float(r[c])), (f, c, r)
        assert os.path.exists(os.path.join(out, f.replace(".csv", ".md")))
    with open(os.path.join(out, "results.json")) as fh:
        json.load(fh)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("POPCOMP_NO_PROGRESS", "1")


EXTRA = {"nn": ["--betas", "0,1e-2,0.1"]}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Each ``popcomp repro <name> --quick`` run once per module: (out folder, results.json).
    ``nn`` runs with the β grid 0, 1e-2, 0.1 (0.1 per weight is β ≈ 50 in the paper's units)."""
    cache = {}

    def get(name):
        if name not in cache:
            out = str(tmp_path_factory.mktemp(name))
            old = os.environ.get("POPCOMP_NO_PROGRESS")
            os.environ["POPCOMP_NO_PROGRESS"] = "1"
            try:
                assert main(["repro", name, "--quick", "--seed", "1", "--out", out, "--device", "cpu",
                             *EXTRA.get(name, [])]) == 0
            finally:
                if old is None:
                    os.environ.pop("POPCOMP_NO_PROGRESS")
                else:
                    os.environ["POPCOMP_NO_PROGRESS"] = old
            with open(os.path.join(out, "results.json")) as fh:
                cache[name] = (out, json.load(fh))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["linreg", "nn", "spectral", "bounds"])
def test_repro_quick(name, quick_run):
    out, _ = quick_run(name)
    _check(out, name)


def test_linreg_quick_kmeans_beats_erm_and_lemma3(quick_run):
    # bu2020 Fig. 4: K-means at small K has a lower expected population risk than ERM; from the
    # run's own numbers, the paired difference at K = 2 is more than 3 standard errors below 0.
    # Lemma 3: the ERM generalization error is within 4 s.e. of eq. (17).
    _, res = quick_run("linreg")
    rows = res["rows"]
    erm = rows[0]
    assert erm["algorithm"] == "ERM"
    assert abs(erm["gen_mean"] - res["lemma3"]) < 4 * erm["gen_se"]
    km = {r["K"]: r for r in rows if r["algorithm"] == "K-means"}
    assert km[2]["pop_minus_erm_mean"] < -3 * km[2]["pop_minus_erm_se"] < 0
    assert 2 in res["kmeans_beats_erm_at_K"]
    # Theorem 3 at the rate upper bound (not the labels' description length), every row
    for r in rows[1:]:
        assert r["gen_mean"] - 3 * r["gen_se"] <= r["thm3_bound"], r
    for r in km.values():
        assert r["rate_nats"] > 0 and math.isfinite(r["desc_len_nats"])
    # the Oracle's distortion is below eq. (23) (Theorem 4's achievability) within 3 s.e.
    for r in rows:
        if r["algorithm"] == "Oracle":
            assert r["distortion_mean"] - 3 * r["distortion_se"] <= r["DR_bound"], r


def test_nn_quick_generalization_gap_falls_with_beta(quick_run):
    # bu2020 Fig. 7: a larger β lowers the generalization error of DRHW K-means and raises its
    # empirical risk. From the run's numbers (4 models, each on its own training subsample): at
    # the largest β of the grid, the paired difference gen(β) − gen(β = 0) over the same models
    # is more than 2 standard errors below 0 for every K, and the empirical risk is higher by
    # more than 2 (unpaired) standard errors.
    _, res = quick_run("nn")
    assert res["subsample"] == "fresh" and res["weight_decay"] == 1e-4 and res["batch_size"] == 10
    sweep = res["sweep"]
    bmax = max(r["beta"] for r in sweep)
    assert bmax == 0.1
    for K in sorted({r["K"] for r in sweep}):
        r0 = next(r for r in sweep if r["K"] == K and r["beta"] == 0)
        r = next(r for r in sweep if r["K"] == K and r["beta"] == bmax)
        assert r["gen_minus_HW_mean"] + 2 * r["gen_minus_HW_se"] < 0, r
        assert r["emp_risk_mean"] - r0["emp_risk_mean"] > 2 * (r["emp_risk_se"] + r0["emp_risk_se"]), r


def test_demo_quick(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--device", "cpu"]) == 0
    _check(out, "demo")
    txt = capsys.readouterr().out
    assert "size_bytes" in txt and "DRHW" in txt and "spectral pruning" in txt


@pytest.mark.parametrize("argv, needle", [
    (["repro", "nosuch"], "invalid choice"),
    (["repro", "linreg", "--trials", "-5"], "--trials must be >= 2"),
    (["repro", "linreg", "--d", "50", "--n", "51"], "n > d + 1"),
    (["repro", "linreg", "--d", "60", "--n", "40"], "n > d + 1"),
    (["repro", "linreg", "--trials", "abc"], "invalid int value"),
    (["repro", "nn", "--models", "0"], "--models must be >= 2"),
    (["repro", "nn", "--clusters", "2,x"], "comma-separated"),
    (["repro", "nn", "--fraction", "1.5"], "--fraction"),
    (["repro", "nn", "--clusters", "2,4", "--fig7-k", "3"], "--fig7-k must be one of"),
    (["demo", "--bits", "9"], "--bits must lie in 1..8"),
    (["demo", "--device", "cuda:7"] if not __import__("torch").cuda.is_available() else
     ["demo", "--bits", "0"], "error"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    # every bad value is named by its flag, before any work (and with --quick too)
    (["repro", "linreg", "--quick", "--trials", "1"], "--trials must be >= 2"),
    (["repro", "linreg", "--kmax", "0"], "--kmax must be >= 1"),
    (["repro", "linreg", "--d", "5", "--n", "20", "--kmax", "6"], "--kmax must be at most --d"),
    (["repro", "linreg", "--chunk", "0"], "--chunk must be >= 1"),
    (["repro", "linreg", "--noise-var", "nan"], "--noise-var must be > 0"),
    (["repro", "linreg", "--resolution", "0"], "--resolution must be finite and > 0"),
    (["repro", "linreg", "--resolution", "inf"], "--resolution must be finite and > 0"),
    (["repro", "nn", "--weight-decay=-1e-4"], "--weight-decay must be finite and >= 0"),
    (["repro", "nn", "--lr", "0"], "--lr must be finite and > 0"),
    (["repro", "nn", "--subsample", "some"], "invalid choice"),
    (["repro", "nn", "--init", "orthogonal"], "invalid choice"),
    (["repro", "linreg", "--seed", "-1"], "--seed must be in 0.."),
    (["repro", "linreg", "--seed", str(2**64)], "--seed must be in 0.."),
    (["repro", "nn", "--epochs", "0"], "--epochs must be >= 1"),
    (["repro", "nn", "--quick", "--epochs", "-3"], "--epochs must be >= 1"),
    (["repro", "nn", "--quick", "--models", "1"], "--models must be >= 2"),
    (["repro", "nn", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["repro", "nn", "--clusters", "0,2"], "--clusters must list integers in 1..256"),
    (["repro", "nn", "--clusters", "2,100000"], "--clusters must list integers in 1..256"),
    (["repro", "nn", "--clusters", ","], "--clusters must list integers in 1..256"),
    (["repro", "nn", "--clusters", "2,x"], "--clusters must be a comma-separated list"),
    (["repro", "nn", "--betas", "1e-3,x"], "--betas must be a comma-separated list"),
    (["repro", "nn", "--betas", "nan,1e-3"], "--betas must be finite"),
    (["repro", "nn", "--betas=-1e-3,1e-2"], "--betas must be finite and >= 0"),
    (["repro", "nn", "--betas", "0"], "--betas must contain at least one"),
    (["repro", "nn", "--fraction", "nan"], "--fraction"),
    (["repro", "nn", "--threads", "0"], "--threads must be >= 1"),
    (["repro", "nn", "--hessian", "exact"], "invalid choice"),
    (["repro", "nn", "--diameter", "cubic"], "invalid choice"),
    (["repro", "nn", "--quick", "--fig7-k", "3"], "--fig7-k must be one of"),
    (["repro", "spectral", "--epochs", "0"], "--epochs must be >= 1"),
    (["repro", "spectral", "--quick", "--rates", "0.5,2"], "--rates must lie in (0, 1]"),
    (["repro", "spectral", "--rates", "0.5,a"], "--rates must be a comma-separated list"),
    (["repro", "spectral", "--threads", "-1"], "--threads must be >= 1"),
    (["repro", "bounds", "--quick", "--epochs", "0"], "--epochs must be >= 1"),
    (["repro", "bounds", "--hidden", "64,x"], "--hidden must be a comma-separated list"),
    (["repro", "bounds", "--hidden", "64,0"], "--hidden must list positive widths"),
    (["repro", "bounds", "--fraction", "0"], "--fraction must be in (0, 1]"),
    (["demo", "--quick", "--epochs", "0"], "--epochs must be >= 1"),
    (["demo", "--bits", "2,x"], "--bits must be a comma-separated list"),
    (["demo", "--keep", "0.5,x"], "--keep must be a comma-separated list"),
    (["demo", "--keep", "1"], "--keep must lie in (0, 1)"),
    (["demo", "--device", "meta"], "--device 'meta': must be auto, cpu, cuda or cuda:N"),
    (["demo", "--device", "bogus"], "--device 'bogus'"),
    (["demo", "--device", "cuda:99"], "--device cuda:99"),
    (["repro", "bounds", "--device", "cuda:-1"], "--device 'cuda:-1'"),
])
def test_bad_input_exits_nonzero_without_traceback(argv, needle, tmp_path, capsys):
    out = tmp_path / "x"
    if argv and argv[0] in ("repro", "demo") and len(argv) > 1 and argv[1] != "nosuch":
        argv = [*argv, "--out", str(out)]
    try:
        rc = main(argv)  # any exception other than SystemExit would be a traceback
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc not in (0, None)
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err
    assert not out.exists()  # reported before any output is written


def test_bad_value_error_names_the_subcommand(tmp_path, capsys):
    assert main(["repro", "nn", "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("popcomp repro nn: error: --epochs")


# ---- --quick changes only the defaults: options given explicitly always win -------------------
def _presets():
    import importlib

    from popcomp.experiments import EXPERIMENTS

    for name in (*EXPERIMENTS, "demo"):
        mod = importlib.import_module(f"popcomp.experiments.{name}")
        cmd = ["demo"] if name == "demo" else ["repro", name]
        for dest, (full, quick) in mod.PRESETS.items():
            yield cmd, dest, full, quick


PRESETS = list(_presets())


def test_every_command_has_quick_presets():
    assert {tuple(c) for c, *_ in PRESETS} == {("demo",), ("repro", "linreg"), ("repro", "nn"),
                                                ("repro", "spectral"), ("repro", "bounds")}


@pytest.mark.parametrize("cmd, dest, full, quick", PRESETS,
                         ids=[f"{' '.join(c)}:{d}" for c, d, *_ in PRESETS])
def test_quick_changes_only_defaults(cmd, dest, full, quick):
    flag = "--" + dest.replace("_", "-")
    assert full != quick
    assert getattr(resolve_args([*cmd]), dest) == full
    assert getattr(resolve_args([*cmd, "--quick"]), dest) == quick
    # an explicit value wins, also when it equals the full default (a string compare used to
    # treat that as "not given") and when it is larger than the quick preset (a min() used to cap it)
    assert getattr(resolve_args([*cmd, "--quick", flag, str(full)]), dest) == full
    assert getattr(resolve_args([*cmd, flag, str(full), "--quick"]), dest) == full
    other = {"trials": 3000, "kmax": 8, "models": 7, "epochs": 27, "clusters": "3,5",
             "betas": "0,2e-3", "rates": "0.3", "bits": "3", "keep": "0.4,0.2"}[dest]
    assert getattr(resolve_args([*cmd, "--quick", flag, str(other)]), dest) == other
    assert getattr(resolve_args([*cmd, flag, str(other)]), dest) == other


def test_quick_keeps_explicit_nn_settings_the_review_example():
    a = resolve_args(["repro", "nn", "--quick", "--epochs", "7", "--models", "10",
                      "--clusters", "2,3,4,5,6,7,8"])
    assert (a.epochs, a.models, a.K) == (7, 10, [2, 3, 4, 5, 6, 7, 8])
    assert a.betas == "0,1e-3,1e-2"  # not given: still the quick preset
    assert a.beta_grid == [0.0, 1e-3, 1e-2]


def test_quick_keeps_explicit_values_in_every_command():
    a = resolve_args(["repro", "linreg", "--quick", "--trials", "5000", "--kmax", "10"])
    assert (a.trials, a.kmax) == (5000, 10)
    a = resolve_args(["repro", "spectral", "--quick", "--epochs", "20", "--rates", "0.1,0.25,0.5"])
    assert (a.epochs, a.rate_list) == (20, [0.1, 0.25, 0.5])
    a = resolve_args(["repro", "bounds", "--quick", "--epochs", "40"])
    assert a.epochs == 40
    a = resolve_args(["demo", "--quick", "--epochs", "40", "--bits", "2,3,4", "--keep", "0.5,0.25"])
    assert (a.epochs, a.bit_list, a.keep_list) == (40, [2, 3, 4], [0.5, 0.25])


def test_resolve_args_reports_bad_values_and_default_out():
    with pytest.raises(UserError, match="--epochs must be >= 1"):
        resolve_args(["repro", "bounds", "--quick", "--epochs", "0"])
    assert resolve_args(["repro", "linreg", "--quick"]).out == os.path.join("popcomp-out", "linreg")
    assert resolve_args(["demo", "--out", "somewhere"]).out == "somewhere"


def test_run_resolves_a_namespace_without_the_cli(tmp_path, monkeypatch):
    """Experiments run from Python with a bare Namespace get the same defaults."""
    import argparse

    from popcomp.experiments import bounds

    class Stop(Exception):
        pass

    def stop(args):
        raise Stop

    monkeypatch.setattr(bounds, "start", stop)
    a = argparse.Namespace(quick=True, seed=0, out=str(tmp_path), device="cpu", epochs=None,
                           fraction=1.0, hidden="8", threads=1)
    with pytest.raises(Stop):
        bounds.run(a)
    assert a.epochs == 15


def test_python_m_popcomp_bad_input_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "popcomp", "repro", "linreg", "--d", "10", "--n", "5",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "n > d + 1" in r.stderr and "Traceback" not in r.stderr


def test_info():
    r = subprocess.run([sys.executable, "-m", "popcomp", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert '"cpu"' in r.stdout and "usable" in r.stdout


def _unwritable_folder(tmp_path):
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return str(d)
    return "/proc/self"  # an existing folder that not even root can write into


@pytest.mark.skipif(not hasattr(os, "geteuid") or not os.path.isdir("/proc/self"),
                    reason="needs POSIX and /proc")
@pytest.mark.parametrize("cmd", [["repro", "linreg"], ["demo"]])
def test_existing_unwritable_out_folder_is_a_clear_error(cmd, tmp_path, capsys):
    out = _unwritable_folder(tmp_path)
    rc = main([*cmd, "--quick", "--out", out, "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not writable" in err, err
