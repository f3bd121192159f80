"""Hugging Face transformers models built from small configs with random weights (no download):
Hessian diagonals with no user-side wrapper code -- dict batches, ModelOutput outputs,
filter_fn selecting the Linear / Conv1D layers -- against per-sample autograd oracles, on real
text shipped with Python (the docstrings of the standard library, byte-level tokens)."""
import inspect
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import popcomp.hessian as H  # noqa: E402


def byte_tokens(T: int, n: int) -> torch.Tensor:
    """n sequences of T byte tokens (vocabulary 256) of the docstrings of json and inspect."""
    text = (inspect.getdoc(json) + "\n" + inspect.getdoc(inspect)).encode("utf-8")
    ids = torch.tensor(list(text[: n * T]), dtype=torch.long)
    assert ids.numel() == n * T
    return ids.view(n, T)


def next_token_ce(logits, ids):
    """Next-token cross-entropy of a causal LM (mean over the predicted positions)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # config notices of tiny random models
        return fn(*a, **k)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    return _quiet(transformers.GPT2LMHeadModel, cfg)


def bert():
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32)
    return _quiet(transformers.BertModel, cfg)


def per_sample_fisher(model, loss, batches, names):
    """sum_s (d l_s / d w)^2 by one autograd backward per sample (the oracle)."""
    params = dict(model.named_parameters())
    res = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    model.eval()
    for inputs, target in batches:
        B = next(iter(inputs.values())).shape[0]
        for s in range(B):
            one = {k: v[s : s + 1] for k, v in inputs.items()}
            gs = torch.autograd.grad(loss(model(**one).logits, target[s : s + 1]),
                                     [params[n] for n in names])
            for n, g in zip(names, gs):
                res[n] += g.double() ** 2
    return res


def linear_or_conv1d(m, name):
    return isinstance(m, (nn.Linear, Conv1D)) and name != "lm_head"  # lm_head: tied to wte


def test_gpt2_fisher_with_filter_fn_equals_per_sample_autograd():
    model = gpt2()
    ids = byte_tokens(16, 6)
    batches = [({"input_ids": ids[:4]}, ids[:4]), ({"input_ids": ids[4:]}, ids[4:])]
    h = H.diagonal(model, next_token_ce, batches, method="fisher", filter_fn=linear_or_conv1d,
                   progress=False)
    convs = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(convs) == 8
    assert list(h) == [f"{n}.{p}" for n in convs for p in ("weight", "bias")]
    assert h["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    ref = per_sample_fisher(model, next_token_ce, batches, list(h))
    for k in h:
        torch.testing.assert_close(h[k].double(), ref[k], rtol=1e-4,
                                   atol=1e-5 * float(ref[k].abs().max()))
    assert h.num_samples == 6


def test_gpt2_label_free_and_hutchinson_with_fused_attention():
    model = gpt2()
    ids = byte_tokens(16, 4)
    # label-free: the logits kept unchanged, probes of the 256-wide output (ggn_mc-style)
    h = H.diagonal(model, None, [{"input_ids": ids}], method="fisher", filter_fn=linear_or_conv1d,
                   mc_samples=2, seed=0, progress=False)
    assert len(h) == 16 and all(float(v.min()) >= 0 for v in h.values())
    assert all(float(v.sum()) > 0 for k, v in h.items() if k.endswith("weight"))
    last = lambda m, n: n == "transformer.h.1.mlp.c_proj"  # noqa: E731
    # hutchinson through the default (SDPA) attention: twice differentiable on the math kernel
    hh = H.diagonal(model, next_token_ce, [({"input_ids": ids}, ids)], method="hutchinson",
                    filter_fn=last, num_probes=4, seed=0, progress=False)
    assert list(hh) == ["transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"]
    assert all(torch.isfinite(v).all() for v in hh.values())


def test_gpt2_ggn_mc_through_output_fn_is_unbiased_for_the_exact_ggn():
    model = gpt2()
    ids = byte_tokens(8, 2)
    last = lambda m, n: n == "transformer.h.1.mlp.c_proj"  # noqa: E731
    kw = dict(filter_fn=last, output_fn=lambda out: out.logits[:, :-1].transpose(1, 2),
              progress=False)
    data = [({"input_ids": ids}, ids[:, 1:])]  # nn.CrossEntropyLoss on (B, C, T) logits
    with pytest.warns(UserWarning, match="ggn_mc"):  # 255 x 7 columns per sample
        exact = H.diagonal(model, nn.CrossEntropyLoss(), data, method="ggn", **kw)
    mc = H.diagonal(model, nn.CrossEntropyLoss(), data, method="ggn_mc", mc_samples=400, seed=0,
                    **kw)
    w = "transformer.h.1.mlp.c_proj.weight"
    err = float((mc[w] - exact[w]).norm() / exact[w].norm())
    assert err < 0.15, err


def test_bert_encoder_dict_batches_label_free():
    model = bert()
    ids = byte_tokens(12, 4)
    mask = torch.ones_like(ids)
    mask[2:, 9:] = 0  # padded samples
    batch = {"input_ids": ids, "attention_mask": mask}
    lin = lambda m, n: isinstance(m, nn.Linear)  # noqa: E731
    with pytest.raises(TypeError, match=r"output_fn.*last_hidden_state.*pooler_output"):
        H.diagonal(model, None, [batch], filter_fn=lin, progress=False)
    out_fn = lambda out: out.last_hidden_state  # noqa: E731
    with pytest.warns(UserWarning, match="384 columns per sample"):  # 12 x 32 outputs
        exact = H.diagonal(model, None, [batch], method="ggn", filter_fn=lin, output_fn=out_fn,
                           progress=False, max_columns=512)
    n_lin = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(exact) == 2 * n_lin and exact.num_samples == 4
    # the probes estimate the same diagonal (sum over samples of diag(J_s^T J_s))
    est = H.diagonal(model, None, [batch], method="ggn_mc", filter_fn=lin, output_fn=out_fn,
                     mc_samples=64, seed=0, progress=False)
    num = sum(float((est[k] - exact[k]).square().sum()) for k in exact)
    den = sum(float(exact[k].square().sum()) for k in exact)
    assert (num / den) ** 0.5 < 0.3
    # the oracle for one layer: diag(J^T J) of the hidden states by autograd, sample by sample
    name = "encoder.layer.1.output.dense"
    W = model.get_submodule(name).weight
    ref = torch.zeros_like(W, dtype=torch.float64)
    model.eval()
    for s in range(4):
        hs = model(input_ids=ids[s : s + 1], attention_mask=mask[s : s + 1]).last_hidden_state
        flat = hs.reshape(-1)
        for j in range(flat.numel()):
            g, = torch.autograd.grad(flat[j], W, retain_graph=True)
            ref += g.double() ** 2
    torch.testing.assert_close(exact[name + ".weight"].double(), ref, rtol=1e-3,
                               atol=1e-5 * float(ref.abs().max()))


# ---- quantize_ end to end: calibrate, palettize (Conv1D included), run, save / load ----------


def _weighted_error(model, dense, h):
    """sum over the Hessian's weights of h * (palettized - dense)^2."""
    mods = dict(model.named_modules())
    return sum(float((h[k] * (mods[k[:-7]].weight - dense[k]) ** 2).sum())
               for k in h if k.endswith(".weight"))


def test_gpt2_calibrated_palettized_generates_and_round_trips_through_save_load(tmp_path):
    import copy

    import popcomp
    from popcomp.quantize import Palettized

    model = gpt2()
    ids = byte_tokens(16, 8)
    batches = [({"input_ids": ids[:4]}, ids[:4]), ({"input_ids": ids[4:]}, ids[4:])]
    h = H.diagonal(model, next_token_ce, batches, method="fisher", filter_fn=linear_or_conv1d,
                   progress=False)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain = popcomp.quantize_(copy.deepcopy(model), popcomp.PalettizeConfig(bits=4),
                              filter_fn=linear_or_conv1d)
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=4), hessian=h, filter_fn=linear_or_conv1d)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8 and all(isinstance(m, Palettized) for m in convs.values())
    for n, m in convs.items():
        x = torch.randn(2, 5, m.weight.shape[0])
        assert m.weight.shape == dense[n + ".weight"].shape  # (in, out), as Conv1D stores it
        assert m.weight_packed.shape[0] == m.nf  # the (out, in) matrix is packed
        assert len(torch.unique(m.weight[:, 0])) <= 16  # 4 bits: 16 centers per output column
        with torch.no_grad():  # palettized_linear computes x @ weight + bias
            torch.testing.assert_close(m(x), x @ m.weight + m.bias, rtol=1e-5, atol=1e-5)
    # exact HW K-means is the optimum of the Hessian-weighted error: below plain K-means'
    assert _weighted_error(model, dense, h) < _weighted_error(plain, dense, h)
    prompt = ids[:2, :4]
    model.eval()  # (built from a config: in training mode, dropout on)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        out = _quiet(model.generate, input_ids=prompt, attention_mask=torch.ones_like(prompt),
                     max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 256
    popcomp.save(model, tmp_path / "gpt2.safetensors")
    fresh = _quiet(transformers.GPT2LMHeadModel, model.config).eval()  # random weights
    popcomp.load(fresh, tmp_path / "gpt2.safetensors")
    assert all(isinstance(fresh.get_submodule(n), Palettized) for n in convs)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, logits)
        again = _quiet(fresh.generate, input_ids=prompt, attention_mask=torch.ones_like(prompt),
                       max_new_tokens=6, do_sample=False)
    assert torch.equal(again, out)
    # torch.save (pickle) of the palettized model, and back to dense Conv1D layers
    import io

    buf = io.BytesIO()
    torch.save(fresh, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(input_ids=ids).logits, logits)
    w = {n: m.weight for n, m in convs.items()}
    popcomp.dequantize_(model)
    for n in convs:
        assert type(model.get_submodule(n)) is Conv1D
        assert torch.equal(model.get_submodule(n).weight, w[n])


def test_bert_label_free_calibrated_palettized_round_trips_through_save_load(tmp_path):
    import copy

    import popcomp
    from popcomp.quantize import PalettizedLinear

    model = bert()
    ids = byte_tokens(12, 4)
    mask = torch.ones_like(ids)
    mask[2:, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    lin = lambda m, n: isinstance(m, nn.Linear)  # noqa: E731
    h = H.diagonal(model, None, [batch], method="ggn_mc", filter_fn=lin, mc_samples=8, seed=0,
                   output_fn=lambda out: out.last_hidden_state, progress=False)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain = popcomp.quantize_(copy.deepcopy(model), popcomp.PalettizeConfig(bits=4), filter_fn=lin)
    # the pooler is not reached from last_hidden_state: its diagonal is 0, and quantize_ says so
    with pytest.warns(UserWarning, match="'pooler.dense' is all zero"):
        popcomp.quantize_(model, popcomp.PalettizeConfig(bits=4), hessian=h, filter_fn=lin)
    n_lin = sum(isinstance(m, PalettizedLinear) for m in model.modules())
    assert n_lin == 2 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    assert _weighted_error(model, dense, h) < _weighted_error(plain, dense, h)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    cos = F.cosine_similarity(out.reshape(-1, 32), ref.reshape(-1, 32), dim=1)
    assert float(cos.min()) > 0.9, float(cos.min())
    popcomp.save(model, tmp_path / "bert.safetensors")
    fresh = _quiet(transformers.BertModel, model.config).eval()
    popcomp.load(fresh, tmp_path / "bert.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, out)
