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

from popcomp.cli import main  # noqa: E402

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


@pytest.mark.parametrize("name", ["linreg", "nn", "spectral", "bounds"])
def test_repro_quick(name, tmp_path, capsys):
    out = str(tmp_path / name)
    assert main(["repro", name, "--quick", "--seed", "1", "--out", out, "--device", "cpu"]) == 0
    _check(out, name)


def test_linreg_quick_reports_kmeans_vs_erm(tmp_path, capsys):
    out = str(tmp_path / "lr")
    assert main(["repro", "linreg", "--quick", "--trials", "500", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    assert res["trials"] == 500 and res["thm3_holds"] and res["thm4_oracle_holds"]
    assert "K-means" in res["verdict"]


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
])
def test_bad_input_exits_nonzero_without_traceback(argv, needle, tmp_path, capsys):
    if argv and argv[0] in ("repro", "demo") and len(argv) > 1 and argv[1] != "nosuch":
        argv = [*argv, "--out", str(tmp_path / "x")]
    try:
        rc = main(argv)  # any exception other than SystemExit would be a traceback
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc not in (0, None)
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err


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
