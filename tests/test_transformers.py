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
