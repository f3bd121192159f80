"""popcomp.quantize_ / PalettizeConfig / palettized modules / save-load / size report /
dequantize_ / select_beta."""
import copy
import math

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import popcomp
from popcomp.quantize import (
    PalettizedConv1d, PalettizedConv2d, PalettizedEmbedding, PalettizedLinear, pack_indices,
    unpack_indices,
)


def _net():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.c1 = nn.Conv1d(6, 8, 3, padding=1)
            self.c2 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
            self.fc = nn.Linear(8 * 5 + 4 * 9, 5)

        def forward(self, tok, img):
            a = self.c1(self.emb(tok).transpose(1, 2)).relu().flatten(1)
            b = self.c2(img).relu().flatten(1)
            return self.fc(torch.cat([a, b], 1))

    return Net()


def _data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 20, (n, 5), generator=g)
    img = torch.randn(n, 2, 6, 6, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return (tok, img), y


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip(bits):
    for n in (1, 7, 1001):
        idx = torch.randint(0, 1 << bits, (n,))
        p = pack_indices(idx, bits)
        assert p.dtype == torch.uint8 and p.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack_indices(p, bits, n), idx)


@pytest.mark.parametrize("gran,gs", [("per_tensor", None), ("per_channel", None), ("per_group", 2)])
def test_quantize_modules_compute_the_dequantized_dense_module(gran, gs):
    model = _net()
    x, y = _data()
    h = popcomp.hessian.diagonal(model, nn.CrossEntropyLoss(), [(x, y)], progress=False)
    cfg = popcomp.PalettizeConfig(k=5, granularity=gran, group_size=gs, beta=0.1)
    popcomp.quantize_(model, cfg, hessian=h)
    assert isinstance(model.emb, PalettizedEmbedding) and isinstance(model.c1, PalettizedConv1d)
    assert isinstance(model.c2, PalettizedConv2d) and isinstance(model.fc, PalettizedLinear)
    assert "weight" not in dict(model.named_parameters()) and "fc.weight" not in model.state_dict()
    for name, m in [("emb", model.emb), ("c1", model.c1), ("c2", model.c2), ("fc", model.fc)]:
        w = m.weight
        assert w.dtype == torch.float32
        rows = {"per_tensor": 1, "per_channel": w.shape[0], "per_group": w.numel() // 2}[gran]
        # k = 5 centers, padded to 2**3 entries with copies of the last one
        assert m.weight_codebook.shape == (rows, 8) and m.weight_codebook.dtype == torch.float16
        assert torch.equal(m.weight_codebook[:, 5:], m.weight_codebook[:, 4:5].expand(-1, 3))
        # ceil(log2 5) = 3 bits, each row of the (out, fan-in) index matrix in blocks of 32
        fan_in = w[0].numel()
        assert m.weight_packed.dtype == torch.uint8
        assert m.weight_packed.shape == (w.shape[0], math.ceil(fan_in / 32) * 32 * 3 // 8)
        # at most k distinct values per codebook, all from the codebook's k centers
        vals = w.reshape(rows, -1)
        cb = m.weight_codebook[:, :5].float()
        assert bool((vals.unsqueeze(-1) == cb.unsqueeze(1)).any(-1).all())
    # exactly what dense modules with the dequantized weights compute
    tok, img = x
    ref_fc = nn.Linear(76, 5)
    ref_fc.weight.data, ref_fc.bias.data = model.fc.weight.clone(), model.fc.bias.clone()
    inp = torch.randn(3, 76)
    # (the lookup-table matmul sums in another order than F.linear: float32 rounding apart)
    torch.testing.assert_close(model.fc(inp), ref_fc(inp), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.c2(img), F.conv2d(img, model.c2.weight, model.c2.bias, 2, 1))
    e = model.emb(tok)
    assert torch.equal(e, F.embedding(tok, model.emb.weight))
    assert torch.equal(model.c1(e.transpose(1, 2)), F.conv1d(e.transpose(1, 2), model.c1.weight, model.c1.bias, padding=1))


def test_hessian_weighting_matters_and_uniform():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 4))
    w = lin[0].weight.detach().clone()
    h = torch.ones(4, 64)
    h[:, :3] = 1e4  # three very sensitive weights per row: get (almost) their own centers
    popcomp.quantize_(lin, popcomp.PalettizeConfig(bits=2, granularity="per_channel", method="exact",
                                                   codebook_dtype=torch.float32),
                      hessian={"0.weight": h})
    err_hw = (lin[0].weight - w)[:, :3].abs().mean()
    lin2 = nn.Sequential(nn.Linear(64, 4))
    lin2[0].weight.data.copy_(w)
    popcomp.quantize_(lin2, popcomp.PalettizeConfig(bits=2, method="exact", codebook_dtype=torch.float32))
    err_u = (lin2[0].weight - w)[:, :3].abs().mean()
    assert err_hw < err_u / 3
    # the codebook is the K-means solution: matches popcomp.kmeans1d on the same rows
    r = popcomp.kmeans1d(w, 4, h, method="exact")
    torch.testing.assert_close(lin[0].weight_codebook, r.centers.float())


def test_save_load_roundtrip_bit_exact(tmp_path):
    pytest.importorskip("safetensors")
    model = _net()
    x, y = _data()
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=3, granularity="per_group", group_size=2,
                                                     codebook_dtype=torch.float32))
    out = model(*x)
    path = tmp_path / "m.safetensors"
    popcomp.save(model, path)
    fresh = _net()  # dense, same architecture
    popcomp.load(fresh, path)
    assert isinstance(fresh.fc, PalettizedLinear)
    sd1, sd2 = model.state_dict(), fresh.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    assert torch.equal(fresh(*x), out)
    # the file holds the packed form, not dense weights
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "fc.weight_packed" in keys and "fc.weight" not in keys
    # loading into an already palettized model works too
    popcomp.load(model, path)
    assert torch.equal(model(*x), out)


def test_dequantize_restores_dense_modules(monkeypatch):
    from popcomp.ops.backends.cpu import palettized as cpu_pal

    model = _net()
    # a batch above GEMM_MIN_M on the decode + GEMM path: the palettized Linear decodes its
    # weight and runs the dense GEMM, so the dense module's output is bit-identical (the
    # compiled LUT matmul sums in another order)
    monkeypatch.setattr(cpu_pal, "has_large_batch_kernel", lambda: False)
    x, _ = _data(n=cpu_pal.GEMM_MIN_M + 1)
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2), filter_fn=lambda m, n: n in ("fc", "c2"))
    assert isinstance(model.fc, PalettizedLinear) and type(model.c1) is nn.Conv1d
    out = model(*x)
    w = model.fc.weight.clone()
    popcomp.dequantize_(model)
    assert type(model.fc) is nn.Linear and type(model.c2) is nn.Conv2d
    assert isinstance(model.fc.weight, nn.Parameter) and torch.equal(model.fc.weight, w)
    assert torch.equal(model(*x), out)
    assert list(dict(model.fc.named_parameters())) == ["weight", "bias"]


def test_size_report_arithmetic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    popcomp.quantize_(model, popcomp.PalettizeConfig(k=3, granularity="per_channel"))
    rep = popcomp.size_report(model)
    assert [r.name for r in rep.layers] == ["0", "2"]
    r0 = rep.layers[0]
    assert r0.numel == 60 and r0.index_bits == 2 and r0.codebooks == 6
    # indices (each of the 6 rows padded to a block of 32 2-bit indices: 8 bytes) + fp16
    # codebooks (3 centers padded to 2**2 entries)
    assert r0.packed_bytes == 6 * math.ceil(10 / 32) * 32 * 2 // 8 + 6 * 4 * 2
    assert r0.bits_per_weight == pytest.approx(r0.packed_bytes * 8 / 60)
    assert r0.original_bits == 60 * 32
    assert r0.ratio_packed == pytest.approx(60 * 32 / (r0.packed_bytes * 8))
    # entropy-coded size: sum over rows of n_row * H(labels_row) + the bits of each center in
    # the codebook dtype stored (fp16: 16; issue 16 item 13, was 32)
    lab = model[0].labels()
    ent = 0.0
    for row in lab:
        p = torch.bincount(row, minlength=3).double() / row.numel()
        p = p[p > 0]
        ent += float(-(p * p.log2()).sum()) * row.numel()
    assert r0.entropy_bits == pytest.approx(ent + 16 * 6 * 3)
    assert r0.ratio_entropy == pytest.approx(60 * 32 / (ent + 16 * 18))
    m32 = copy.deepcopy(model[:1]).float()
    popcomp.dequantize_(m32)
    popcomp.quantize_(m32, popcomp.PalettizeConfig(k=3, codebook_dtype=torch.float32))
    r32 = popcomp.size_report(m32).layers[0]
    assert r32.entropy_bits == pytest.approx(r0.entropy_bits + 16 * 18)  # same labels, fp32 centers
    t = rep.total
    assert t.numel == 60 + 18 and t.packed_bytes == r0.packed_bytes + rep.layers[1].packed_bytes
    assert t.ratio_packed == pytest.approx((78 * 32) / (t.packed_bytes * 8))
    assert rep.other_params_bytes == 3 * 4  # the second layer's bias
    assert "total" in str(rep)


def test_bad_input_leaves_model_unchanged():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    h = popcomp.hessian.diagonal(model, nn.CrossEntropyLoss(), [(x, y)], progress=False)
    cfg = popcomp.PalettizeConfig(bits=2)

    def check(exc, match, **kw):
        # config: a PalettizeConfig, or a function building one (a config that is bad in
        # itself raises when it is built, inside the pytest.raises too)
        args = dict(config=cfg, hessian=None)
        args.update(kw)
        with pytest.raises(exc, match=match):
            config = args["config"]() if callable(args["config"]) else args["config"]
            popcomp.quantize_(model, config, hessian=args["hessian"], filter_fn=args.get("filter_fn"))
        assert set(model.state_dict()) == set(before)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    check(ValueError, "bits", config=lambda: popcomp.PalettizeConfig(bits=0))
    check(ValueError, "bits", config=lambda: popcomp.PalettizeConfig(bits=9))
    check(ValueError, "k", config=lambda: popcomp.PalettizeConfig(k=1))
    check(ValueError, "group_size", config=popcomp.PalettizeConfig(bits=2, granularity="per_group", group_size=7))
    # per_group's default group_size is 128 (issue 16; it was required): it does not divide these layers
    check(ValueError, "group_size=128 does not divide", config=lambda: popcomp.PalettizeConfig(bits=2, granularity="per_group"))
    check(ValueError, "granularity", config=lambda: popcomp.PalettizeConfig(bits=2, granularity="per_row"))
    missing = {k: v for k, v in h.items() if k != "fc.weight"}
    check(ValueError, r"hessian.*fc\.weight", hessian=missing)
    check(ValueError, r"hessian\['fc\.weight'\].*shape", hessian={**h, "fc.weight": h["fc.weight"].t()})
    neg = {**h, "c1.weight": -h["c1.weight"] - 1}
    check(ValueError, r"hessian\['c1\.weight'\].*negative", hessian=neg)
    nan = {**h, "c2.weight": h["c2.weight"].clone().fill_(float("nan"))}
    check(ValueError, r"hessian\['c2\.weight'\].*NaN", hessian=nan)
    check(ValueError, "hessian", config=popcomp.PalettizeConfig(bits=2, sensitivity="hessian"))
    model.ln = nn.LayerNorm(3)
    before.update({"ln." + k: v.clone() for k, v in model.ln.state_dict().items()})
    check(ValueError, "filter_fn.*LayerNorm", filter_fn=lambda m, n: n == "ln")


def test_select_beta_cross_validation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    X, Y = torch.randn(60, 8), torch.randint(0, 3, (60,))
    data = [(X[i : i + 10], Y[i : i + 10]) for i in range(0, 60, 10)]
    cfg = popcomp.PalettizeConfig(bits=2)
    sel = popcomp.select_beta(model, nn.CrossEntropyLoss(), data, [0.0, 0.01, 1.0], cfg, folds=3)
    assert [r["beta"] for r in sel.table] == [0.0, 0.01, 1.0]
    assert all(len(r["fold_losses"]) == 3 for r in sel.table)
    assert sel.best_beta == min(sel.table, key=lambda r: r["val_loss"])["beta"]
    assert type(model[0]) is nn.Linear  # the model itself is untouched
    # with a held-out set: the losses are those of the quantized copies on it
    h = popcomp.hessian.diagonal(model, nn.CrossEntropyLoss(), data[:4], progress=False)
    sel = popcomp.select_beta(model, nn.CrossEntropyLoss(), data[:4], [0.0, 0.5], cfg,
                              val_data=data[4:], hessian=h)
    import copy

    m = copy.deepcopy(model)
    popcomp.quantize_(m, popcomp.PalettizeConfig(bits=2, beta=0.5), hessian=h)
    with torch.no_grad():
        ref = float(nn.functional.cross_entropy(m(X[40:]), Y[40:]))
    assert sel.table[1]["val_loss"] == pytest.approx(ref, rel=1e-5)


def test_evaluate_loss_uses_eval_mode_and_restores_it():
    # validation losses (select_beta) must not depend on dropout noise; the mode is restored
    from popcomp.quantize import evaluate_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    a = evaluate_loss(model, nn.CrossEntropyLoss(), data)
    b = evaluate_loss(model, nn.CrossEntropyLoss(), data)
    assert a == b
    model.eval()
    assert evaluate_loss(model, nn.CrossEntropyLoss(), data) == a
    model.train()
    evaluate_loss(model, nn.CrossEntropyLoss(), data)
    assert model.training and model[2].training


def test_module_shared_at_two_names_is_replaced_everywhere():
    # one module object reachable under two names (weight sharing by reuse): both names get the
    # same palettized module, and dequantize_ restores both
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(3, 4)
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2))
    assert isinstance(model[0], PalettizedLinear) and model[2] is model[0]
    ref = F.linear(F.linear(x, model[0].weight, model[0].bias).relu(), model[0].weight, model[0].bias)
    # the LUT kernel sums in its own order: equal to float32 rounding, not bit for bit
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert len(popcomp.size_report(model).layers) == 1
    popcomp.dequantize_(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0]
    assert torch.equal(model(x), ref)


def test_fp16_codebook_overflow_is_a_clear_error_and_model_unchanged():
    # a center outside the fp16 range would be stored as inf: refuse (naming the layer and the
    # way out) before any module is replaced
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = 1e6
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"codebook_dtype.*1|1.*codebook_dtype"):
        popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2))
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # with fp32 codebooks it is representable
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2, codebook_dtype=torch.float32))
    assert bool(torch.isfinite(model[1].weight).all()) and float(model[1].weight.max()) == 1e6


def test_meta_weights_are_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"meta"):
        popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2))
    assert type(model[0]) is nn.Linear


def _saved_2bit(tmp_path, make):
    """A model from make() (seed 0), palettized to 2 bits and saved: (model, file path)."""
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    src = make()
    popcomp.quantize_(src, popcomp.PalettizeConfig(bits=2))
    path = tmp_path / "m.safetensors"
    popcomp.save(src, path)
    return src, path


def test_load_failure_leaves_the_model_unchanged(tmp_path):
    # a file that does not fit the model: no module is left palettized with uninitialized
    # buffers, and an already palettized module keeps its own packed form
    _, path = _saved_2bit(tmp_path, lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))

    def snapshot(m):
        return {k: v.clone() for k, v in m.state_dict().items()}, [type(c) for c in m]

    for bad in (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5)),       # shape of the 2nd layer
                nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(2, 2))):  # missing keys
        sd, types = snapshot(bad)
        with pytest.raises((ValueError, RuntimeError)):
            popcomp.load(bad, path)
        assert [type(c) for c in bad] == types
        assert all(torch.equal(bad.state_dict()[k], v) for k, v in sd.items())
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(2, 2))
    popcomp.quantize_(other, popcomp.PalettizeConfig(bits=3, seed=1))
    sd, types = snapshot(other)
    meta = other[0].palette
    with pytest.raises(RuntimeError):
        popcomp.load(other, path)
    assert [type(c) for c in other] == types and other[0].palette == meta
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())



def test_select_beta_default_relative_grid_needs_no_data_with_a_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    X, Y = torch.randn(60, 8), torch.randint(0, 3, (60,))
    data = [(X[i : i + 10], Y[i : i + 10]) for i in range(0, 60, 10)]
    h = popcomp.hessian.diagonal(model, nn.CrossEntropyLoss(), data[:4], progress=False)
    cfg = popcomp.PalettizeConfig(bits=2)
    sel = popcomp.select_beta(model, nn.CrossEntropyLoss(), val_data=data[4:], hessian=h,
                              config=cfg)
    from popcomp.quantize.select_beta import DEFAULT_BETA_REL_GRID

    assert sel.relative and [r["beta"] for r in sel.table] == list(DEFAULT_BETA_REL_GRID)
    for r in sel.table:  # each row: the loss of the copy quantized with that beta_rel
        m = popcomp.quantize_(copy.deepcopy(model), popcomp.PalettizeConfig(bits=2, beta_rel=r["beta"]),
                              hessian=h)
        with torch.no_grad():
            assert r["val_loss"] == pytest.approx(float(F.cross_entropy(m(X[40:]), Y[40:])), rel=1e-5)
    assert sel.config(cfg).beta_rel == sel.best_beta and "beta_rel" in str(sel)
    with pytest.raises(ValueError, match="data: needed to compute the Hessian"):
        popcomp.select_beta(model, nn.CrossEntropyLoss(), val_data=data[4:], config=cfg)
    with pytest.raises(ValueError, match="data: needed for the cross-validation folds"):
        popcomp.select_beta(model, nn.CrossEntropyLoss(), hessian=h, config=cfg)


def test_beta_rel_is_beta_times_the_mean_codebook_hessian_sum_and_scale_free():
    torch.manual_seed(0)
    lin = nn.Linear(64, 6)
    h = torch.rand(6, 64) ** 4
    cfg = popcomp.PalettizeConfig(bits=2, beta_rel=0.05)
    a = popcomp.quantize_(nn.Sequential(copy.deepcopy(lin)), cfg, hessian={"0.weight": h})[0]
    beta = 0.05 * float(h.double().sum(1).mean())  # per channel: one codebook per row
    b = popcomp.quantize_(nn.Sequential(copy.deepcopy(lin)), popcomp.PalettizeConfig(bits=2, beta=beta),
                          hessian={"0.weight": h})[0]
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, popcomp.quantize_(nn.Sequential(copy.deepcopy(lin)),
                                                       popcomp.PalettizeConfig(bits=2),
                                                       hessian={"0.weight": h})[0].weight)
    # weights x 8 and Hessian x 2**20 (exact in floating point): the same labels with beta_rel,
    # other labels with the absolute beta that fitted the unscaled layer
    big = copy.deepcopy(lin)
    with torch.no_grad():
        big.weight.mul_(8)
    hb = {"0.weight": h * 2.0 ** 20}
    c = popcomp.quantize_(nn.Sequential(copy.deepcopy(big)), cfg, hessian=hb)[0]
    assert torch.equal(c.labels(), a.labels()) and torch.equal(c.weight, 8 * a.weight)
    d = popcomp.quantize_(nn.Sequential(copy.deepcopy(big)), popcomp.PalettizeConfig(bits=2, beta=beta),
                          hessian=hb)[0]
    assert not torch.equal(d.labels(), a.labels())
    with pytest.raises(ValueError, match="beta.*beta_rel.*not both"):
        popcomp.PalettizeConfig(bits=2, beta=0.1, beta_rel=0.1)
    with pytest.raises(ValueError, match="beta_rel"):
        popcomp.PalettizeConfig(bits=2, beta_rel=-1.0)


def test_select_beta_accumulates_the_hessian_of_the_selected_weights_only():
    # a LayerNorm (not handled by fisher) outside filter_fn's selection, or a frozen weight that
    # is selected, must not break the cross-validation
    torch.manual_seed(0)
    X, Y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    data = [(X[i : i + 10], Y[i : i + 10]) for i in range(0, 40, 10)]
    cfg = popcomp.PalettizeConfig(bits=2)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    sel = popcomp.select_beta(model, nn.CrossEntropyLoss(), data, [0.0, 0.1], cfg,
                              filter_fn=lambda m, n: isinstance(m, nn.Linear))
    assert len(sel.table) == 2 and type(model[0]) is nn.Linear
    frozen = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    frozen[0].weight.requires_grad_(False)
    sel = popcomp.select_beta(frozen, nn.CrossEntropyLoss(), data, [0.0, 0.1], cfg, folds=2)
    assert len(sel.table) == 2 and not frozen[0].weight.requires_grad
    with pytest.raises(ValueError, match="val_data"):
        popcomp.select_beta(frozen, nn.CrossEntropyLoss(), data, [0.0], cfg, val_data=[])


def test_tied_weights_stay_tied_and_take_the_hessian_of_the_parameter():
    # an LM-style tie (the output layer's weight is the embedding's): one palettized tensor,
    # found in the Hessian mapping under the parameter's name, counted once in the size report
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    h = {name: torch.rand(p.shape) for name, p in model.named_parameters()}  # as hessian.diagonal
    assert list(h) == ["0.weight"]
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2), hessian=h)
    assert model[1].weight_packed is model[0].weight_packed
    assert model[1].weight_codebook is model[0].weight_codebook
    rep = popcomp.size_report(model)
    assert rep.total.numel == 40
    assert rep.total.packed_bytes == model[0].weight_packed.numel() + 10 * 4 * 2


def test_select_beta_with_hutchinson_clamps_its_own_estimates():
    # Rademacher estimates of a diagonal can be negative; select_beta computes them itself, so it
    # must hand quantize_ a valid (non-negative) mapping
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    X, Y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    data = [(X[i : i + 10], Y[i : i + 10]) for i in range(0, 40, 10)]
    h = popcomp.hessian.diagonal(model, nn.CrossEntropyLoss(), data[:2], "hutchinson", seed=0,
                                 progress=False)
    assert any(bool((v < 0).any()) for v in h.values())  # the case this test is about
    sel = popcomp.select_beta(model, nn.CrossEntropyLoss(), data, [0.0, 0.1],
                              popcomp.PalettizeConfig(bits=2), method="hutchinson", folds=2)
    assert len(sel.table) == 2


def test_hessian_names_with_a_ddp_prefix_get_a_hint():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"missing entries for \['0\.weight'\].*'module\.'"):
        popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2),
                          hessian={"module.0.weight": torch.ones(4, 4)})



def test_hessian_keyed_by_module_or_parameter_name_gives_the_same_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    h = {"0.weight": torch.rand(5, 6), "2.weight": torch.rand(3, 5)}
    cfg = popcomp.PalettizeConfig(bits=2, method="exact")
    a = popcomp.quantize_(copy.deepcopy(model), cfg, hessian=h)
    b = popcomp.quantize_(copy.deepcopy(model), cfg, hessian={"0": h["0.weight"], "2": h["2.weight"]})
    c = popcomp.quantize_(copy.deepcopy(model), cfg)  # plain K-means differs (the oracle that h is used)
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[2].weight, b[2].weight)
    assert not (torch.equal(a[0].weight, c[0].weight) and torch.equal(a[2].weight, c[2].weight))


def test_hessian_of_a_wrapper_or_a_submodule_gets_the_prefix_hint():
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    cfg = popcomp.PalettizeConfig(bits=2)
    ones = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"start with 'enc\.body\.'.*k\[9:\]"):
        popcomp.quantize_(copy.deepcopy(inner), cfg,
                          hessian={"enc.body.0.weight": ones, "enc.body.2": ones})
    with pytest.raises(ValueError, match=r"model's names start with 'm\.'.*'m\.' \+ k"):
        popcomp.quantize_(nn.ModuleDict({"m": copy.deepcopy(inner)}), cfg,
                          hessian={"0.weight": ones, "2.weight": ones})
    with pytest.raises(ValueError, match=r"missing entries for \['0\.weight', '2\.weight'\]$"):
        # no one prefix explains both
        popcomp.quantize_(copy.deepcopy(inner), cfg, hessian={"x.0.weight": ones, "y.2.weight": ones})


def test_an_all_zero_hessian_warns_naming_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    h = {"0.weight": torch.zeros(5, 6), "1.weight": torch.rand(3, 5)}
    with pytest.warns(UserWarning, match=r"'0' is all zero.*plain K-means") as rec:
        popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2), hessian=h)
    assert not any("'1'" in str(w.message) for w in rec)


# --- padding_idx ------------------------------------------------------------------------------
@pytest.mark.parametrize("gran,gs", [("per_tensor", None), ("per_channel", None), ("per_group", 4)])
def test_embedding_padding_row_is_kept_exact(tmp_path, gran, gs):
    # PyTorch keeps the padding_idx row as it is (zeros unless set otherwise, no gradient): it
    # stays exact, outside the clustering, through quantize_, save/load and dequantize_
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 8, padding_idx=3), nn.Embedding(12, 8, padding_idx=-1))
    with torch.no_grad():
        model[1].weight[11] = torch.linspace(-5, 5, 8)  # a padding vector set by the user
    w0, w1 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    cfg = popcomp.PalettizeConfig(bits=2, granularity=gran, group_size=gs, method="exact",
                                  codebook_dtype=torch.float32)
    popcomp.quantize_(model, cfg)
    assert torch.equal(model[0].weight[3], torch.zeros(8))
    assert torch.equal(model[1].weight[11], w1[11])
    tok = torch.tensor([[3, 0, 11, 5]])
    assert torch.equal(model[0](tok), F.embedding(tok, model[0].weight, padding_idx=3))
    if gran == "per_tensor":  # the padding row does not pull the codebook
        r = popcomp.kmeans1d(torch.cat([w0[:3], w0[4:]]).reshape(1, -1), 4, method="exact")
        torch.testing.assert_close(model[0].weight_codebook, r.centers.float())
    rep = popcomp.size_report(model)  # the exact rows are counted with the palettized layers
    assert rep.other_params_bytes == 0
    assert rep.layers[0].packed_bytes == (model[0].weight_packed.numel()
                                          + model[0].weight_codebook.numel() * 4 + 8 * 4)
    path = tmp_path / "m.safetensors"
    popcomp.save(model, path)
    fresh = nn.Sequential(nn.Embedding(12, 8, padding_idx=3), nn.Embedding(12, 8, padding_idx=-1))
    popcomp.load(fresh, path)
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[1].weight, model[1].weight)
    popcomp.dequantize_(model)
    assert type(model[0]) is nn.Embedding and model[0].padding_idx == 3
    assert torch.equal(model[1].weight[11], w1[11])
    model[0](tok).sum().backward()  # and the dense module again gives it no gradient
    assert torch.equal(model[0].weight.grad[3], torch.zeros(8))


def test_tied_weights_stay_tied_through_save_and_load(tmp_path):
    pytest.importorskip("safetensors")

    def tied():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        m[1].weight = m[0].weight
        return m

    model = tied()
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2))
    path = tmp_path / "m.safetensors"
    popcomp.save(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # stored once
        assert set(f.keys()) == {"0.weight_packed", "0.weight_codebook"}
    ref = popcomp.size_report(model).total
    for fresh in (tied(), model):  # into a dense model, and into the palettized one
        popcomp.load(fresh, path)
        assert fresh[1].weight_packed is fresh[0].weight_packed
        assert fresh[1].weight_codebook is fresh[0].weight_codebook
        assert torch.equal(fresh[1].weight, model[0].weight)
        assert popcomp.size_report(fresh).total == ref
    # a module reachable under two names is one module after loading too
    lin = nn.Linear(4, 4)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    popcomp.quantize_(seq, popcomp.PalettizeConfig(bits=2))
    popcomp.save(seq, path)
    lin2 = nn.Linear(4, 4)
    seq2 = nn.Sequential(lin2, nn.ReLU(), lin2)
    popcomp.load(seq2, path)
    assert seq2[2] is seq2[0] and torch.equal(seq2[0].weight, seq[0].weight)


def test_dequantize_keeps_tied_weights_tied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2))
    w = model[0].weight
    popcomp.dequantize_(model)
    assert model[1].weight is model[0].weight and torch.equal(model[0].weight, w)
    assert len(list(model.parameters())) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_load_into_a_model_of_another_dtype_converts(tmp_path, dtype):
    # like load_state_dict: the model's dtypes win; a palettized layer keeps the file's codebooks
    # and dequantizes to the model's weight dtype
    src, path = _saved_2bit(tmp_path, lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)))
    for dst in (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)).to(dtype),
                popcomp.quantize_(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)).to(dtype),
                                  popcomp.PalettizeConfig(bits=3, seed=1))):
        popcomp.load(dst, path)
        for i in (0, 1):
            assert dst[i].weight.dtype == dtype
            assert torch.equal(dst[i].weight, src[i].weight.to(dtype))
            assert torch.equal(dst[i].weight_codebook, src[i].weight_codebook)
        assert dst[1].bias.dtype == dtype
        x = torch.tensor([[1, 2]])
        assert dst(x).dtype == dtype
        torch.testing.assert_close(dst(x), src(x).to(dtype))
        rep = popcomp.size_report(dst)
        assert rep.layers[1].original_bits == 12 * torch.finfo(dtype).bits



def test_load_checks_the_weight_shape_of_an_already_palettized_module(tmp_path):
    # same packed size and codebooks, transposed weight: refused, not reshaped silently
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    cfg = popcomp.PalettizeConfig(bits=2, granularity="per_tensor")
    src = popcomp.quantize_(nn.Sequential(nn.Linear(4, 6, bias=False)), cfg)
    path = tmp_path / "m.safetensors"
    popcomp.save(src, path)
    dst = popcomp.quantize_(nn.Sequential(nn.Linear(6, 4, bias=False)), cfg)
    with pytest.raises(ValueError, match=r"model: 0\.weight has shape \(4, 6\).*\(6, 4\)"):
        popcomp.load(dst, path)
    assert dst[0].palette.weight_shape == (4, 6)

def test_quantize_an_already_palettized_module_is_an_error():
    # quantize_ does not silently skip (nor stack) a second palettization: the modules are named
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=3), filter_fn=lambda m, n: n == "0")
    packed = model[0].weight_packed.clone()
    with pytest.raises(ValueError, match=r"model: \['0'\] already palettized.*dequantize_"):
        popcomp.quantize_(model, popcomp.PalettizeConfig(bits=1))
    with pytest.raises(ValueError, match=r"\['0'\] already palettized"):
        popcomp.quantize_(model, popcomp.PalettizeConfig(bits=1), filter_fn=lambda m, n: n == "0")
    assert type(model[2]) is nn.Linear and model[0].palette.k == 8
    assert torch.equal(model[0].weight_packed, packed)
    # a filter_fn that leaves it out palettizes the rest; dequantize_ first re-quantizes
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=1), filter_fn=lambda m, n: n == "2")
    assert isinstance(model[2], PalettizedLinear) and model[0].palette.k == 8
    popcomp.dequantize_(model)
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=1))
    assert model[0].palette.k == 2 and model[2].palette.k == 2


def test_dequantize_restores_requires_grad(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)

    def net():
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2), nn.Embedding(5, 4))
        m[0].weight.requires_grad_(False)
        m[2].weight.requires_grad_(False)
        return m

    model = net()
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2))
    path = tmp_path / "m.safetensors"
    popcomp.save(model, path)
    popcomp.dequantize_(model)
    assert [m.weight.requires_grad for m in model] == [False, True, False]
    assert model[0].bias.requires_grad  # untouched
    fresh = net()  # a loaded model: the requires_grad of the model it was loaded into
    popcomp.load(fresh, path)
    popcomp.dequantize_(fresh)
    assert [m.weight.requires_grad for m in fresh] == [False, True, False]


def test_selecting_one_side_of_a_tie_warns():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    with pytest.warns(UserWarning, match=r"\['0'\] share their weight"):
        popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2),
                          filter_fn=lambda m, n: isinstance(m, nn.Linear))
    # the embedding kept the dense weight: the two no longer agree
    assert not torch.equal(model[0].weight, model[1].weight)
    # selecting both keeps one shared palettized weight and does not warn
    emb2 = nn.Embedding(10, 4)
    head2 = nn.Linear(4, 10, bias=False)
    head2.weight = emb2.weight
    both = nn.Sequential(emb2, head2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        popcomp.quantize_(both, popcomp.PalettizeConfig(bits=2))
    assert both[0].weight_packed is both[1].weight_packed


# --- config, granularity objects, handler registry, file format -------------------------------
@pytest.mark.parametrize("kw,exc,match", [
    (dict(bits=2, sensitivity="fisher"), ValueError, "sensitivity"),
    (dict(bits=2, codebook_dtype=torch.bfloat16), ValueError, "codebook_dtype"),
    (dict(bits=2, beta=-1.0), ValueError, "beta"),
    (dict(bits=2, beta=float("nan")), ValueError, "beta"),
    (dict(bits=2, max_iter=-1), ValueError, "max_iter"),
    (dict(bits=2, tol=-0.1), ValueError, "tol"),
    (dict(bits=2, seed=1.5), TypeError, "seed"),
    (dict(bits=2, method=None), TypeError, "method"),
    (dict(bits=2, granularity="per_group", group_size=0), ValueError, "group_size"),
    (dict(bits=2, granularity=3), TypeError, "granularity"),
    (dict(k=5, bits=2), ValueError, "k"),
    (dict(), ValueError, "k or bits"),
])
def test_a_bad_config_fails_when_built_naming_the_field(kw, exc, match):
    with pytest.raises(exc, match=match):
        popcomp.PalettizeConfig(**kw)
    # a field assigned after the config was built is checked again by quantize_
    cfg = popcomp.PalettizeConfig(bits=2)
    for key, value in kw.items():
        setattr(cfg, key, value)
    if not kw:
        cfg.bits = None
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(exc, match=match):
        popcomp.quantize_(model, cfg)
    assert type(model[0]) is nn.Linear


def test_granularity_objects_are_the_strings():
    from popcomp.quantize import PerChannel, PerGroup, PerTensor

    with pytest.raises(ValueError, match="group_size"):
        PerGroup(0)
    with pytest.raises(ValueError, match="group_size=4 contradicts"):
        popcomp.PalettizeConfig(bits=2, granularity=PerGroup(2), group_size=4)
    cfg = popcomp.PalettizeConfig(bits=2, granularity="per_group", group_size=2)
    assert cfg.granularity_spec == PerGroup(2) and cfg.resolve() == (4, 2)
    # replace() re-validates and recomputes (the fields keep what was given)
    import dataclasses

    assert dataclasses.replace(cfg, granularity="per_tensor").granularity_spec == PerTensor()
    with pytest.raises(ValueError, match="granularity"):
        dataclasses.replace(cfg, granularity="per_row")
    for obj, name, gs in [(PerTensor(), "per_tensor", None), (PerChannel(), "per_channel", None),
                          (PerGroup(2), "per_group", 2)]:
        a, b = _net(), _net()
        popcomp.quantize_(a, popcomp.PalettizeConfig(bits=2, granularity=obj))
        popcomp.quantize_(b, popcomp.PalettizeConfig(bits=2, granularity=name, group_size=gs))
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.fc.palette == b.fc.palette and a.fc.palette.granularity == name


def test_handler_registry_dispatches_on_the_config_type():
    # a scheme is a config plus a handler: it gets each group of modules sharing one weight, the
    # Hessian of that weight, and its replacements go in only after every handler has returned
    from dataclasses import dataclass

    from popcomp.quantize import QuantizeConfig, register_handler

    @dataclass
    class Round(QuantizeConfig):
        decimals: int = 1
        fail_on: str = ""

    calls = []

    @register_handler(Round)
    def _round(modules, config, hessian):
        calls.append(([n for n, _ in modules], hessian))
        if modules[0][0] == config.fail_on:
            raise ValueError(f"cannot round {config.fail_on}")
        out = []
        for _, m in modules:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            new.load_state_dict(m.state_dict())
            with torch.no_grad():
                new.weight.copy_(torch.round(m.weight, decimals=config.decimals))
            out.append(new)
        return out

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4))
    model[3].weight = model[2].weight  # tied: one group
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = {n: torch.rand(p.shape) for n, p in model.named_parameters() if n.endswith("weight")}
    with pytest.raises(ValueError, match="cannot round 2"):
        popcomp.quantize_(model, Round(fail_on="2"), hessian=h)
    assert model[0] is lin and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    calls.clear()
    popcomp.quantize_(model, Round(decimals=1), hessian=h)
    assert [names for names, _ in calls] == [["0"], ["2", "3"]]
    assert calls[0][1] is h["0.weight"] and calls[1][1] is h["2.weight"]
    assert torch.equal(model[0].weight, torch.round(before["0.weight"], decimals=1))
    calls.clear()
    popcomp.quantize_(model, Round())  # (this handler does not keep ties: three groups now)
    assert [hh for _, hh in calls] == [None, None, None]
    with pytest.raises(TypeError, match=r"config must be a popcomp quantization config.*PalettizeConfig.*got dict"):
        popcomp.quantize_(model, {"bits": 2})


def _read_file(path):
    """(popcomp metadata, tensors) of a file written by popcomp.save."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["popcomp"]), {k: f.get_tensor(k) for k in f.keys()}


def _write_format1(path, info, tensors, out):
    """Rewrite a format-2 file as popcomp 0.x's format 1 wrote it: each packed weight one
    layout-1 bit stream (the old packer, pack_indices), codebooks of k columns."""
    import json

    from safetensors.torch import save_file

    from popcomp.quantize import unpack_rows

    t1 = dict(tensors)
    for n, d in info["palettized"].items():
        fan_in = math.prod(d["weight_shape"][1:])
        for key in (f"{n}.weight_packed", f"{n}.weight_codebook"):
            key = info["shared"].get(key, key)
            if key.endswith("packed") and t1[key] is tensors[key]:
                t1[key] = pack_indices(unpack_rows(tensors[key], d["bits"], fan_in), d["bits"])
            elif key.endswith("codebook") and t1[key] is tensors[key]:
                t1[key] = tensors[key][:, : d["k"]].contiguous()
    save_file(t1, str(out), metadata={"popcomp": json.dumps({**info, "format": 1})})
    return t1


def test_load_refuses_an_unknown_format_and_a_corrupt_packed_buffer(tmp_path):
    import json

    src, path = _saved_2bit(tmp_path, lambda: nn.Sequential(nn.Linear(4, 6)))
    from safetensors.torch import save_file

    info, tensors = _read_file(path)
    assert info["format"] == 2
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"popcomp": json.dumps({**info, "format": 3})})
    dst = nn.Sequential(nn.Linear(4, 6))
    with pytest.raises(ValueError, match=r"format 3.*reads formats \(1, 2\)"):
        popcomp.load(dst, newer)
    bad = tmp_path / "bad.safetensors"
    # format 2: 6 rows of one block of 32 2-bit indices (8 bytes each)
    save_file({**tensors, "0.weight_packed": tensors["0.weight_packed"][:-1].clone()}, str(bad),
              metadata={"popcomp": json.dumps(info)})
    with pytest.raises(ValueError, match=r"corrupt.*0\.weight_packed.*needs uint8 of shape \(6, 8\)"):
        popcomp.load(dst, bad)
    assert type(dst[0]) is nn.Linear
    # format 1: one bit stream of 24 2-bit indices (6 bytes)
    old = tmp_path / "old.safetensors"
    t1 = _write_format1(path, info, tensors, old)
    save_file({**t1, "0.weight_packed": t1["0.weight_packed"][:-1].clone()}, str(bad),
              metadata={"popcomp": json.dumps({**info, "format": 1})})
    with pytest.raises(ValueError, match=r"corrupt.*0\.weight_packed.*needs 6 uint8"):
        popcomp.load(dst, bad)
    assert type(dst[0]) is nn.Linear
    popcomp.load(dst, path)
    assert torch.equal(dst[0].weight, src[0].weight)


# --- file formats 1 (layout-1 bit streams) and 2 (layout-2 rows) --------------------------------
@pytest.mark.parametrize("gran,gs", [("per_tensor", None), ("per_channel", None), ("per_group", 2)])
def test_a_format1_file_loads_as_format2_and_computes_the_same(tmp_path, gran, gs):
    pytest.importorskip("safetensors")
    model = _net()
    x, _ = _data()
    popcomp.quantize_(model, popcomp.PalettizeConfig(k=5, granularity=gran, group_size=gs))
    path, old = tmp_path / "m.safetensors", tmp_path / "old.safetensors"
    popcomp.save(model, path)
    info, tensors = _read_file(path)
    t1 = _write_format1(path, info, tensors, old)
    assert t1["fc.weight_packed"].numel() == math.ceil(5 * 76 * 3 / 8)  # a layout-1 stream
    assert t1["fc.weight_codebook"].shape[1] == 5
    fresh = _net()
    popcomp.load(fresh, old)
    sd1, sd2 = model.state_dict(), fresh.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:  # repacked as layout 2, codebooks padded: what quantize_ made
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    assert torch.equal(fresh(*x), model(*x))
    # and saved again, it is a format-2 file
    popcomp.save(fresh, tmp_path / "again.safetensors")
    assert _read_file(tmp_path / "again.safetensors")[0]["format"] == 2


def test_a_format1_file_with_tied_weights_stays_tied(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)

    def tied():
        m = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Linear(4, 10, bias=False))
        m[1].weight = m[0].weight
        return m

    model = popcomp.quantize_(tied(), popcomp.PalettizeConfig(k=3))
    path, old = tmp_path / "m.safetensors", tmp_path / "old.safetensors"
    popcomp.save(model, path)
    info, tensors = _read_file(path)
    _write_format1(path, info, tensors, old)
    fresh = tied()
    popcomp.load(fresh, old)
    assert fresh[1].weight_packed is fresh[0].weight_packed
    assert fresh[1].weight_codebook is fresh[0].weight_codebook
    assert torch.equal(fresh[0].weight_packed, model[0].weight_packed)
    tok = torch.tensor([[0, 3, 9]])
    assert torch.equal(fresh(tok), model(tok))


def test_load_refuses_indices_beyond_k_and_inconsistent_metadata(tmp_path):
    # a corrupt file is refused before the model is touched, naming the layer and the tensor;
    # no index can read outside a codebook at run time
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = popcomp.quantize_(nn.Sequential(nn.Linear(40, 6)), popcomp.PalettizeConfig(k=3))
    path = tmp_path / "m.safetensors"
    popcomp.save(src, path)
    info, tensors = _read_file(path)
    bad = tmp_path / "bad.safetensors"
    dst = nn.Sequential(nn.Linear(40, 6))
    before = {k: v.clone() for k, v in dst.state_dict().items()}

    def refused(t, meta, match, fmt=2):
        save_file(t, str(bad), metadata={"popcomp": json.dumps({**info, "format": fmt,
                                                                "palettized": {"0": meta}})})
        with pytest.raises(ValueError, match=match):
            popcomp.load(dst, bad)
        assert type(dst[0]) is nn.Linear
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())

    meta = info["palettized"]["0"]
    # format 1 with k = 3 < 2**2 centers: an index 3 is refused
    t1 = _write_format1(path, info, tensors, bad)
    labels = unpack_indices(t1["0.weight_packed"], 2, 240)
    labels[17] = 3
    refused({**t1, "0.weight_packed": pack_indices(labels, 2)}, meta, r"corrupt.*0\.weight_packed.*>= k = 3",
            fmt=1)
    refused(tensors, {**meta, "bits": 9}, r"corrupt.*metadata of 0")
    refused(tensors, {**meta, "k": 5}, r"corrupt.*metadata of 0")
    refused(tensors, {**meta, "rows": 1}, r"corrupt.*0: 1 codebooks")
    refused(tensors, {**meta, "granularity": "per_group", "group_size": 7}, r"corrupt.*group_size 7")
    refused({**tensors, "0.weight_codebook": tensors["0.weight_codebook"][:, :3].clone()}, meta,
            r"corrupt.*0\.weight_codebook.*\(6, 4\)")
    refused({**tensors, "0.weight_codebook": tensors["0.weight_codebook"].double()}, meta,
            r"corrupt.*0\.weight_codebook.*float16 or float32")
    refused({**tensors, "0.weight_packed": tensors["0.weight_packed"].to(torch.int16)}, meta,
            r"corrupt.*0\.weight_packed.*uint8")
    t = dict(tensors)
    del t["0.weight_codebook"]
    refused(t, meta, r"corrupt.*0 has no \['0\.weight_codebook'\]")
    popcomp.load(dst, path)
    assert torch.equal(dst[0].weight, src[0].weight)


def test_hessian_beyond_float32_range_is_rescaled_not_overflowed():
    # a float64 model's Hessian diagonal can hold entries far beyond float32; the K-means
    # objective's minimizer is invariant to one positive scale of h and beta together
    torch.manual_seed(3)
    lin = nn.Linear(16, 4).double()
    h = torch.rand(4, 16, dtype=torch.float64) + 0.1
    outs = []
    for scale in (1.0, 1e300, 1e-300):  # the same problem: h and beta scaled alike
        m = nn.Sequential(copy.deepcopy(lin))
        popcomp.quantize_(m, popcomp.PalettizeConfig(bits=2, method="exact", beta=0.5 * scale),
                          hessian={"0.weight": h * scale})
        outs.append(m[0].weight)
    assert torch.isfinite(outs[1]).all() and torch.isfinite(outs[2]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_state_dict_round_trip_of_a_palettized_model_or_a_clear_error():
    torch.manual_seed(0)
    def net():
        return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    model = popcomp.quantize_(net(), popcomp.PalettizeConfig(bits=3))
    x = torch.randn(4, 8)
    sd = model.state_dict()
    assert "0.weight" not in sd and "0.weight_packed" in sd
    other = popcomp.quantize_(net(), popcomp.PalettizeConfig(bits=3))  # same config, other weights
    assert not torch.equal(other(x), model(x))
    other.load_state_dict(sd)
    assert torch.equal(other(x), model(x))
    # another configuration, or a dense checkpoint: an error naming the layer, strict or not
    two = popcomp.quantize_(net(), popcomp.PalettizeConfig(bits=2))
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"0\.weight_packed has shape.*another configuration.*popcomp\.save"):
            two.load_state_dict(sd, strict=strict)
        with pytest.raises(RuntimeError, match=r"0 is palettized but the state dict holds a dense 0\.weight"):
            copy.deepcopy(model).load_state_dict(net().state_dict(), strict=strict)


def test_quantize_checkpoint_streams_shards_into_the_packed_format(tmp_path):
    """quantize_checkpoint on two safetensors shards + a Hessian file gives the file save()
    writes after quantize_ in memory (same bytes of every tensor), loadable with popcomp.load."""
    import safetensors.torch as st

    from popcomp.quantize.stream import quantize_checkpoint

    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = net()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    h = {"1.weight": torch.rand(16, 8), "3.weight": torch.rand(4, 16)}
    st.save_file({k: sd[k] for k in ("0.weight", "1.weight")}, str(tmp_path / "a.safetensors"))
    st.save_file({k: sd[k] for k in ("1.bias", "3.weight", "3.bias")}, str(tmp_path / "b.safetensors"))
    st.save_file(h, str(tmp_path / "h.safetensors"))
    cfg = popcomp.PalettizeConfig(bits=3)
    pal = quantize_checkpoint([tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                              tmp_path / "q.safetensors", cfg, hessian=[tmp_path / "h.safetensors"],
                              progress=False)
    assert sorted(pal) == ["0", "1", "3"]
    ref = popcomp.quantize_(copy.deepcopy(model), cfg, filter_fn=lambda m, n: n == "0")  # no Hessian
    popcomp.quantize_(ref, cfg, hessian=h, filter_fn=lambda m, n: n in ("1", "3"))
    fresh = popcomp.load(net(), tmp_path / "q.safetensors")
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randint(0, 10, (5,))
    assert torch.equal(fresh[3](fresh[2](fresh[1](fresh[0](x)))), ref[3](ref[2](ref[1](ref[0](x)))))
    with pytest.raises(ValueError, match="group_size=5 does not divide"):
        quantize_checkpoint([tmp_path / "a.safetensors"], tmp_path / "r.safetensors",
                            popcomp.PalettizeConfig(bits=3, granularity="per_group", group_size=5),
                            progress=False)


def test_cli_quantize_writes_a_loadable_file_and_refuses_bad_options(tmp_path, capsys):
    import safetensors.torch as st

    from popcomp.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    st.save_file({k: v.detach().clone() for k, v in model.state_dict().items()},
                 str(tmp_path / "m.safetensors"))
    out = str(tmp_path / "q.safetensors")
    assert main(["quantize", str(tmp_path / "m.safetensors"), "--out", out, "--bits", "3",
                 "--no-progress"]) == 0
    assert "2 tensors palettized" in capsys.readouterr().out
    ref = popcomp.quantize_(copy.deepcopy(model), popcomp.PalettizeConfig(bits=3))
    fresh = popcomp.load(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), out)
    x = torch.randn(3, 64)
    assert isinstance(fresh[0], PalettizedLinear) and torch.equal(fresh(x), ref(x))
    assert main(["quantize", str(tmp_path / "m.safetensors"), "--out", out, "--bits", "9"]) == 2
    assert "bits" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "none.safetensors"), "--out", out]) == 2
    assert "no such file" in capsys.readouterr().err
