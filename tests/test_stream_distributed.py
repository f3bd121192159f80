"""quantize_checkpoint split across the ranks of torch.distributed: the same file as one process."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import popcomp

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net():
    return nn.Sequential(nn.Embedding(40, 24), nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 32),
                         nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 8))


def _checkpoint(tmp_path):
    """A small checkpoint in two shards (weights of several sizes, biases, a norm) and a
    Hessian file for some of the weights; the model and its input files."""
    import safetensors.torch as st

    torch.manual_seed(0)
    model = _net()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = list(sd)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file({k: sd[k] for k in keys[:5]}, str(a))
    st.save_file({k: sd[k] for k in keys[5:]}, str(b))
    h = tmp_path / "h.safetensors"
    st.save_file({"1.weight": torch.rand(48, 24), "5.weight": torch.rand(16, 32)}, str(h))
    return model, [str(a), str(b)], str(h)


def _worker(rank, world, port, inputs, hessian, out, status_dir):
    """One rank: joins a gloo group on 127.0.0.1 (so quantize_checkpoint finds it initialized),
    runs quantize_checkpoint, writes 'ok' or its error to status_dir/<rank>."""
    os.environ["POPCOMP_NO_PROGRESS"] = "1"
    torch.set_num_threads(1)
    from popcomp.quantize.stream import quantize_checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        quantize_checkpoint(inputs, out, popcomp.PalettizeConfig(bits=3), hessian=hessian)
        msg = "ok"
    except Exception as e:  # noqa: BLE001 - reported to the parent through the file
        msg = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(status_dir, str(rank)), "w") as f:
        f.write(msg)


def _spawn(world, inputs, hessian, out, status_dir, timeout=60.0):
    """Runs _worker on ``world`` processes; the status of each rank (fails if any hangs)."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(_worker, args=(world, _free_port(), inputs, hessian, out, str(status_dir)),
                   nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {timeout} s (a hang)")
    return [open(status_dir / str(r)).read() for r in range(world)]


def test_two_ranks_write_the_single_process_file(tmp_path):
    from popcomp.quantize.stream import quantize_checkpoint

    model, inputs, hessian = _checkpoint(tmp_path)
    cfg = popcomp.PalettizeConfig(bits=3)
    single = tmp_path / "single.safetensors"
    pal = quantize_checkpoint(inputs, single, cfg, hessian=[hessian], progress=False)
    assert sorted(pal) == ["0", "1", "3", "5", "7"]
    status = tmp_path / "status"
    status.mkdir()
    out = tmp_path / "two.safetensors"
    assert _spawn(2, inputs, [hessian], str(out), status) == ["ok", "ok"]
    assert out.read_bytes() == single.read_bytes()
    fresh = popcomp.load(_net(), out)
    ref = popcomp.load(_net(), single)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # the palettized weights are close to the originals (3 bits: 8 levels per row)
    w, q = model[1].weight.detach(), fresh[1].weight.detach().float()
    assert (w - q).abs().max() <= (w.amax(1) - w.amin(1)).max() / 2


def test_an_error_on_one_rank_is_raised_on_every_rank_without_a_hang(tmp_path):
    """A wrong-shape Hessian for one weight fails only the rank that palettizes it; the other
    rank raises too (no hang), and the partial output is removed."""
    import safetensors.torch as st

    _, inputs, _ = _checkpoint(tmp_path)
    bad = tmp_path / "bad.safetensors"
    st.save_file({"1.weight": torch.rand(3, 3)}, str(bad))
    status = tmp_path / "status"
    status.mkdir()
    out = tmp_path / "two.safetensors"
    res = _spawn(2, inputs, [str(bad)], str(out), status)
    assert sum(r.startswith("ValueError: hessian['1.weight'] has shape (3, 3)") for r in res) == 1
    assert sum(r.startswith("RuntimeError: quantize_checkpoint: rank(s) [") for r in res) == 1
    assert not out.exists()


def test_torchrun_cli_writes_the_single_process_file(tmp_path):
    """`torchrun --nproc-per-node 2 -m popcomp.cli quantize`: the process group comes from
    torchrun's environment; one summary line (rank 0); the same bytes as one process."""
    _, inputs, hessian = _checkpoint(tmp_path)
    from popcomp.quantize.stream import quantize_checkpoint

    single = tmp_path / "single.safetensors"
    quantize_checkpoint(inputs, single, popcomp.PalettizeConfig(bits=4), hessian=[hessian],
                        progress=False)
    out = tmp_path / "run.safetensors"
    env = dict(os.environ, POPCOMP_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "popcomp.cli", "quantize", *inputs, "--hessian", hessian, "--bits", "4",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("tensors palettized") == 1, r.stdout
    assert out.read_bytes() == single.read_bytes()
