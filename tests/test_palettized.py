"""The palettized (lookup-table) ops popcomp::palettized_linear / palettized_decode, packing
layout 2, and the palettized modules built on them (issue 12).

Oracles: a per-index packer written from the layout's definition (quantize/packing.py), the
dense weight gathered element by element from the indices and codebooks, and float64
F.linear; the ops' pure-torch references are checked against those too."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import popcomp
from popcomp.ops.backends.reference.palettized import (
    palettized_decode_reference, palettized_linear_reference,
)
from popcomp.quantize import (
    PalettizedConv1d, PalettizedConv2d, PalettizedEmbedding, PalettizedLinear, pack_rows,
    row_bytes, unpack_rows,
)

OPS = torch.ops.popcomp
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CB_DTYPES = (torch.float32, torch.float16)
# granularity name -> group_size of the op (0: per tensor / per channel)
GRANULARITIES = {"tensor": 0, "channel": 0, "g32": 32, "g128": 128, "g50": 50}
# float32 products summed in float32: a bound on the accumulation error relative to sum |x w|
ACC_EPS = 2e-6
OUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture
def small_chunks(monkeypatch):
    """Row chunks of 2 KiB in the chunked paths (backward, decode + GEMM), so that small test
    layers take several chunks, and the CPU's decode + GEMM path from batch 9 on (in place of
    the AVX-512 large-batch kernel, which test_large_batch_kernel covers)."""
    from popcomp.ops.backends.cpu import palettized as cpu_pal
    from popcomp.ops.backends.reference import palettized as ref

    monkeypatch.setattr(ref, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(cpu_pal, "GEMM_MIN_M", 8)
    monkeypatch.setattr(cpu_pal, "has_large_batch_kernel", lambda: False)
    try:
        from popcomp.ops.backends.cuda import palettized as cuda_pal
    except ImportError:
        return
    monkeypatch.setattr(cuda_pal, "CHUNK_BYTES", 2048)


class DecodeCalls(TorchDispatchMode):
    """Records the rows of every popcomp::palettized_decode call made inside it."""

    def __enter__(self):
        self.rows = []
        super().__enter__()
        return self.rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is OPS.palettized_decode.default:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


# ---- oracles ---------------------------------------------------------------------------------
PIECES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def naive_pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Layout 2 written index by index from its definition."""
    rows, n = idx.shape
    nbytes = math.ceil(n / 32) * 4 * bits
    out = [[0] * nbytes for _ in range(rows)]
    for r in range(rows):
        for i in range(n):
            v = int(idx[r, i])
            block, t = divmod(i, 32)
            off, shift = block * 4 * bits, 0
            for w in PIECES[bits]:
                j, byte = divmod(t, 4 * w)  # byte t of the piece holds t + j * 4w, bits j*w..
                out[r][off + byte] |= ((v >> shift) & ((1 << w) - 1)) << (j * w)
                off += 4 * w
                shift += w
    return torch.tensor(out, dtype=torch.uint8).reshape(rows, nbytes)


def dense_oracle(idx, cb, group_size, per_channel):
    """W[r, c] = cb[codebook row of (r, c), idx[r, c]] (float64), the codebook row of (r, c)
    being r * ceil(n / group_size) + c // group_size per group, r per channel, 0 per tensor."""
    rows, n = idx.shape
    r = torch.arange(rows).unsqueeze(1).expand(rows, n)
    c = torch.arange(n).unsqueeze(0).expand(rows, n)
    if group_size:
        g = r * math.ceil(n / group_size) + c // group_size
    else:
        g = r if per_channel else torch.zeros_like(r)
    return cb.double().cpu()[g, idx.cpu()]


def make_weight(out, n, bits, gran, cb_dtype=torch.float32, device="cpu", seed=0):
    """(packed, codebook, group_size, dense float64 oracle) of a random palettized weight."""
    g = torch.Generator().manual_seed(seed)
    gs = GRANULARITIES[gran]
    idx = torch.randint(0, 1 << bits, (out, n), generator=g)
    cb_rows = {"tensor": 1, "channel": out}.get(gran) or out * math.ceil(n / max(gs, 1))
    cb = torch.randn(cb_rows, 1 << bits, generator=g).to(cb_dtype)
    W = dense_oracle(idx, cb, gs, gran == "channel")
    return pack_rows(idx, bits).to(device), cb.to(device), gs, W


def linear_oracle(x, W, bias):
    """(float64 x W^T + bias, float64 |x| |W|^T): the exact result and its error scale."""
    x64 = x.detach().double().cpu()
    y = x64 @ W.T
    if bias is not None:
        y = y + bias.detach().double().cpu()
    return y, x64.abs() @ W.abs().T


def assert_linear_close(y, x, W, bias, dtype, w_eps=0.0):
    """y = x W^T + bias to float32 accumulation and one rounding to dtype; ``w_eps``: the
    relative rounding of W where a path multiplies a weight rounded to x's dtype (the CUDA
    decode + tensor-core GEMM path of large batches)."""
    y64, scale = linear_oracle(x, W, bias)
    assert y.dtype == dtype and y.shape == y64.shape
    err = (y.double().cpu() - y64).abs()
    tol = (OUT_EPS[dtype] * y64.abs() + (ACC_EPS * max(1.0, math.sqrt(W.shape[1])) + w_eps) * scale
           + 1e-30)
    assert bool((err <= tol + OUT_EPS[dtype] * 1e-3).all()), float((err - tol).max())


# ---- packing layout 2 ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_rows_is_the_layout_of_the_spec(bits):
    for n in (1, 17, 31, 32, 33, 100):
        idx = torch.randint(0, 1 << bits, (3, n))
        p = pack_rows(idx, bits)
        assert p.dtype == torch.uint8 and p.shape == (3, row_bytes(n, bits))
        assert row_bytes(n, bits) == math.ceil(n / 32) * 4 * bits  # 3 bits: 12 bytes per 32
        assert torch.equal(p, naive_pack(idx, bits))
        assert torch.equal(unpack_rows(p, bits, n), idx)


def test_the_compiled_kernels_read_this_layout():
    C = popcomp._backend.compiled()
    if C is None or not hasattr(C, "palettized_row_bytes"):
        pytest.skip("the compiled core has no palettized kernels")
    assert C.palettized_layout_version == 2
    for bits in range(1, 9):
        for n in (1, 31, 32, 33, 100, 4096):
            assert C.palettized_row_bytes(n, bits) == row_bytes(n, bits)


def test_pack_rows_spot_checks():
    # 4 bits: byte t holds index t (low nibble) and t + 16 (high nibble)
    idx = torch.arange(32).view(1, 32) % 16
    p = pack_rows(idx, 4)
    assert p[0, 0] == 0 and p[0, 1] == 1 | (1 << 4) and p[0, 15] == 15 | (15 << 4)
    # 2 bits: byte 1 holds indices 1, 9, 17, 25
    p = pack_rows(torch.arange(32).view(1, 32) % 4, 2)
    assert p[0, 1] == 0b01010101
    # 3 bits = a 2-bit piece (8 bytes, low bits) then a 1-bit piece (4 bytes, the high bit)
    p = pack_rows(torch.full((1, 32), 0b110), 3)
    assert p.shape == (1, 12)
    assert torch.equal(p[0, :8], torch.full((8,), 0b10101010, dtype=torch.uint8))
    assert torch.equal(p[0, 8:], torch.full((4,), 0xFF, dtype=torch.uint8))


# ---- the ops against the oracles ---------------------------------------------------------------
@pytest.mark.parametrize("gran", list(GRANULARITIES))
@pytest.mark.parametrize("bits", range(1, 9))
def test_decode_matches_the_oracle(devices, bits, gran):
    for n, cbd in ((1, torch.float32), (33, torch.float16), (100, torch.float32)):
        packed, cb, gs, W = make_weight(5, n, bits, gran, cbd, devices)
        for dt in ACT_DTYPES:
            w = OPS.palettized_decode(packed, cb, bits, n, gs, dt)
            assert w.dtype == dt and w.device.type == devices and w.shape == (5, n)
            assert torch.equal(w.cpu(), W.to(dt))  # a codebook value, rounded once
        assert torch.equal(palettized_decode_reference(packed.cpu(), cb.cpu(), bits, n, gs), W.float())


@pytest.mark.parametrize("n", [1, 17, 33, 100])
@pytest.mark.parametrize("gran", list(GRANULARITIES))
@pytest.mark.parametrize("bits", range(1, 9))
def test_linear_matches_the_oracle(devices, bits, gran, n):
    out = 7
    for cbd in CB_DTYPES:
        packed, cb, gs, W = make_weight(out, n, bits, gran, cbd, devices, seed=bits * 100 + n)
        for dt in ACT_DTYPES:
            for use_bias, shape in ((False, (n,)), (True, (3, n)), (True, (2, 3, n)), (False, (17, n))):
                x = torch.randn(shape, device=devices).to(dt)
                bias = torch.randn(out, device=devices).to(dt) if use_bias else None
                y = OPS.palettized_linear(x, packed, cb, bias, bits, n, gs)
                assert y.shape == (*shape[:-1], out) and y.device.type == devices
                assert_linear_close(y, x, W, bias, dt)
                ref = palettized_linear_reference(x, packed, cb, bias, bits, n, gs)
                assert_linear_close(ref, x, W, bias, dt)


@pytest.mark.parametrize("bits,gran,n", [(4, "channel", 100), (3, "g50", 100), (2, "g32", 64),
                                         (4, "g128", 300), (8, "tensor", 33)])
def test_linear_every_batch_size(devices, bits, gran, n, small_chunks):
    # batch 1..40: the kernel (small batches) and the chunked decode + GEMM (large) paths
    packed, cb, gs, W = make_weight(40, n, bits, gran, torch.float16, devices)
    bias = torch.randn(40, device=devices)
    for M in range(1, 41):
        x = torch.randn(M, n, device=devices)
        assert_linear_close(OPS.palettized_linear(x, packed, cb, bias, bits, n, gs), x, W, bias,
                            torch.float32)
    for dt in (torch.float16, torch.bfloat16):  # bias in float32 beside x in 16 bits
        w_eps = OUT_EPS[dt] if devices == "cuda" else 0.0  # (tensor cores above batch 32)
        for M in (1, 8, 33, 40):
            x = torch.randn(M, n, device=devices).to(dt)
            assert_linear_close(OPS.palettized_linear(x, packed, cb, bias, bits, n, gs), x, W,
                                bias, dt, w_eps)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("gran,n", [("channel", 100), ("g50", 130), ("g32", 300), ("tensor", 33)])
def test_large_batch_kernel(devices, bits, gran, n):
    # batches from 23 rows on: on an AVX-512 CPU from 24 the compiled large-batch kernel (panels
    # of 12 weight rows, tiles of 32 x rows, sums in blocks of 256 inputs), elsewhere the row
    # kernels and then decode + GEMM
    packed, cb, gs, W = make_weight(29, n, bits, gran, torch.float16, devices, seed=bits)
    bias = torch.randn(29, device=devices)
    for M, dt in ((23, torch.float32), (24, torch.float16), (31, torch.float32),
                  (32, torch.float32), (33, torch.bfloat16),
                  (64, torch.float16), (97, torch.float32), (130, torch.float32)):
        base = torch.randn(M, n + 3, device=devices).to(dt)
        x = base[:, 1 : n + 1]  # rows n + 3 apart
        for b in (bias, None):
            w_eps = OUT_EPS[dt] if devices == "cuda" and dt != torch.float32 else 0.0
            y = OPS.palettized_linear(x, packed, cb, b, bits, n, gs)
            assert_linear_close(y, x, W, b, dt, w_eps)


def test_linear_reads_non_contiguous_x(devices):
    packed, cb, gs, W = make_weight(9, 50, 3, "channel", device=devices)
    base = torch.randn(6, 4, 120, device=devices)
    for x in (base[:, :, 10:60],              # rows strided
              base[:, 1, 7:57],              # 2-D, row stride 480
              base[::2, :, :100:2],          # inner stride 2
              base[0, :, 5:55].t().contiguous().t(),  # a transposed (column-major) matrix
              base.transpose(0, 1)[:, :, :50]):       # leading dims permuted
        assert not x.is_contiguous()
        y = OPS.palettized_linear(x, packed, cb, None, 3, 50, gs)
        assert_linear_close(y, x, W, None, torch.float32)
    x = base[:, :, :50].clone()
    before = x.clone()
    OPS.palettized_linear(x, packed, cb, None, 3, 50, gs)
    assert torch.equal(x, before)  # inputs never modified


def test_empty_batch(devices):
    packed, cb, gs, W = make_weight(5, 40, 4, "channel", device=devices)
    y = OPS.palettized_linear(torch.randn(0, 40, device=devices), packed, cb, None, 4, 40, gs)
    assert y.shape == (0, 5)
    y = OPS.palettized_linear(torch.randn(2, 0, 40, device=devices), packed, cb, None, 4, 40, gs)
    assert y.shape == (2, 0, 5)


# ---- autograd --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,gran", [(4, "channel"), (3, "g50"), (2, "tensor")])
def test_gradient_wrt_x_matches_autograd_of_the_reference(devices, bits, gran, small_chunks):
    n = 100
    packed, cb, gs, W = make_weight(60, n, bits, gran, device=devices)  # 12 row chunks
    x = torch.randn(2, 5, n, device=devices, requires_grad=True)
    bias = torch.randn(60, device=devices, requires_grad=True)
    dy = torch.randn(2, 5, 60, device=devices)
    y = OPS.palettized_linear(x, packed, cb, bias, bits, n, gs)
    with DecodeCalls() as calls:
        gx, gb = torch.autograd.grad(y, (x, bias), dy)
    assert len(calls) == 12 and max(calls) == 5  # 2 KiB chunks: 5 rows of 100 float32
    xr, br = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    w = palettized_decode_reference(packed, cb, bits, n, gs)
    gxr, gbr = torch.autograd.grad(F.linear(xr, w, br), (xr, br), dy)
    torch.testing.assert_close(gx, gxr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, gbr)
    assert not packed.requires_grad and not cb.requires_grad
    # a 16-bit activation gets its gradient in its dtype
    xh = x.detach().half().requires_grad_()
    (gh,) = torch.autograd.grad(OPS.palettized_linear(xh, packed, cb, None, bits, n, gs), xh,
                                dy.half())
    assert gh.dtype == torch.float16
    torch.testing.assert_close(gh.float(), dy.half().float() @ w, rtol=2e-3, atol=2e-2)


def test_double_backward_through_the_gradient(devices, small_chunks):
    # Hutchinson / Hessian-vector products differentiate the gradient again
    n = 40
    packed, cb, gs, W = make_weight(30, n, 4, "channel", device=devices)
    w = W.float().to(devices)
    x = torch.randn(3, n, device=devices, requires_grad=True)
    v = torch.randn(3, n, device=devices)

    def hvp(f):
        (g,) = torch.autograd.grad(torch.tanh(f(x)).pow(2).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return h

    ours = hvp(lambda t: OPS.palettized_linear(t, packed, cb, None, 4, n, gs))
    torch.testing.assert_close(ours, hvp(lambda t: F.linear(t, w)), rtol=1e-4, atol=1e-4)


# ---- opcheck, torch.compile, devices -----------------------------------------------------------
@pytest.mark.parametrize("bits,gran,dt,cbd", [(4, "channel", torch.float32, torch.float16),
                                              (3, "g50", torch.float16, torch.float32),
                                              (1, "tensor", torch.bfloat16, torch.float16),
                                              (8, "g32", torch.float32, torch.float32)])
def test_opcheck(devices, bits, gran, dt, cbd):
    n = 70
    packed, cb, gs, _ = make_weight(12, n, bits, gran, cbd, devices)
    for x, bias in ((torch.randn(3, n, device=devices).to(dt), None),
                    (torch.randn(2, 4, n, device=devices).to(dt).requires_grad_(),
                     torch.randn(12, device=devices).to(dt))):
        torch.library.opcheck(OPS.palettized_linear.default, (x, packed, cb, bias, bits, n, gs))
    torch.library.opcheck(OPS.palettized_decode.default, (packed, cb, bits, n, gs, dt))


def _mlp(bits=4, gran="per_channel", gs=None, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 8))
    popcomp.quantize_(m, popcomp.PalettizeConfig(bits=bits, granularity=gran, group_size=gs,
                                                 max_iter=10))
    return m


def test_compile_of_a_palettized_mlp_matches_eager():
    torch._dynamo.reset()
    m = _mlp(3, "per_group", 8)
    assert all(isinstance(m[i], PalettizedLinear) for i in (0, 2, 4))
    x = torch.randn(5, 48)
    eager = m(x)
    cm = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(cm(x), eager, rtol=1e-5, atol=1e-5)
    xs = torch.randn(2, 7, 48)  # another shape (recompiles or runs dynamic)
    torch.testing.assert_close(cm(xs), m(xs), rtol=1e-5, atol=1e-5)
    # and its backward w.r.t. the input
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(cm(xg).sum(), xg)
    xe = x.clone().requires_grad_()
    (ge,) = torch.autograd.grad(m(xe).sum(), xe)
    torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-5)


def test_cpu_equals_cuda(cuda_device):
    for bits, gran in ((4, "channel"), (3, "g50"), (2, "g128"), (5, "tensor")):
        packed, cb, gs, W = make_weight(33, 100, bits, gran, torch.float16)
        for dt in ACT_DTYPES:
            for M in (1, 5, 40):
                x = torch.randn(M, 100).to(dt)
                y_cpu = OPS.palettized_linear(x, packed, cb, None, bits, 100, gs)
                y_gpu = OPS.palettized_linear(x.to(cuda_device), packed.to(cuda_device),
                                              cb.to(cuda_device), None, bits, 100, gs)
                # both within float32 accumulation and one rounding of the exact result (the
                # GPU's tensor-core path above batch 32 also rounds the weight to x's dtype)
                assert_linear_close(y_cpu, x, W, None, dt)
                w_eps = OUT_EPS[dt] if dt != torch.float32 and M > 32 else 0.0
                assert_linear_close(y_gpu, x, W, None, dt, w_eps)
                if dt == torch.float32:
                    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
            w_gpu = OPS.palettized_decode(packed.to(cuda_device), cb.to(cuda_device), bits, 100,
                                          gs, dt)
            assert torch.equal(w_gpu.cpu(), OPS.palettized_decode(packed, cb, bits, 100, gs, dt))


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_input_names_the_argument(devices):
    n = 40
    packed, cb, gs, _ = make_weight(6, n, 3, "channel", device=devices)
    x = torch.randn(2, n, device=devices)

    def lin(exc, match, **kw):
        args = dict(x=x, packed=packed, codebook=cb, bias=None, bits=3, in_features=n, group_size=0)
        args.update(kw)
        with pytest.raises(exc, match=match):
            OPS.palettized_linear(*args.values())

    lin(ValueError, r"packed must have shape \(out_features, 24\)", packed=packed[:, :-1])
    lin(ValueError, "packed must have shape", packed=packed.reshape(-1))
    lin(TypeError, "packed must be a uint8", packed=packed.to(torch.int8))
    lin(ValueError, r"codebook must be 2-D with 1 \(per tensor\) or out_features = 6", codebook=cb[:3])
    lin(ValueError, r"codebook must be 2-D with out_features \* ceil.* = 12", group_size=20)
    lin(ValueError, r"codebook must have 2\*\*bits = 8 columns", codebook=cb[:, :5])
    lin(TypeError, "codebook must be float16 or float32", codebook=cb.double())
    lin(TypeError, "codebook must be float16 or float32", codebook=cb.to(torch.bfloat16))
    lin(ValueError, r"x must have shape \(\.\.\., in_features\) = \(\.\.\., 40\)", x=x[:, :-1])
    lin(TypeError, "x must be float32, float16 or bfloat16", x=x.double())
    lin(TypeError, "x must be float32, float16 or bfloat16", x=x.to(torch.int32))
    lin(ValueError, r"bias must have shape \(out_features,\) = \(6,\)", bias=torch.zeros(5, device=devices))
    lin(TypeError, "bias must have x's dtype", bias=torch.zeros(6, device=devices, dtype=torch.float16))
    lin(ValueError, "bits must be <= 8", bits=9)
    lin(ValueError, "bits must be >= 1", bits=0)
    lin(ValueError, "group_size must be >= 0", group_size=-1)
    lin(ValueError, "in_features must be >= 1", in_features=0)
    other = "meta"
    lin(ValueError, "packed is on meta but x is on", packed=packed.to(other))
    lin(ValueError, "codebook is on meta but packed is on", codebook=cb.to(other))
    lin(ValueError, "bias is on meta but x is on", bias=torch.zeros(6, device=other))
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        OPS.palettized_decode(packed, cb, 3, n, 0, torch.float64)
    with pytest.raises(ValueError, match="packed must have shape"):
        OPS.palettized_decode(packed, cb, 4, n, 0, torch.float32)


# ---- the palettized modules ---------------------------------------------------------------------
@pytest.mark.parametrize("gran,gs", [("per_tensor", None), ("per_channel", None), ("per_group", 16)])
def test_modules_equal_the_dense_modules_with_the_dequantized_weight(devices, gran, gs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.Conv1d(4, 8, 4), nn.Conv2d(4, 6, 2),
                          nn.Embedding(40, 32), nn.Linear(32, 48, bias=False)).to(devices)
    popcomp.quantize_(model, popcomp.PalettizeConfig(k=11, granularity=gran, group_size=gs,
                                                     max_iter=10))
    lin, c1, c2, emb, lin2 = model
    assert (isinstance(lin, PalettizedLinear) and isinstance(c1, PalettizedConv1d)
            and isinstance(c2, PalettizedConv2d) and isinstance(emb, PalettizedEmbedding))
    exact = {id(m): m.weight.double().cpu().reshape(m.weight.shape[0], -1) for m in model}
    for dt in ACT_DTYPES:
        for m in model:  # the model in dt (codebooks stay as they are)
            m.palette.weight_dtype = dt
            if getattr(m, "bias", None) is not None:
                m.bias.data = m.bias.data.to(dt)
        for m, x in ((lin, torch.randn(3, 5, 48)), (lin2, torch.randn(7, 32)),
                     (lin, torch.randn(48))):
            x = x.to(devices, dt)
            assert_linear_close(m(x), x, exact[id(m)], m.bias, dt)
            if dt == torch.float32:  # F.linear with the dequantized weight, to float32 rounding
                torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)
        x1 = torch.randn(2, 4, 9, device=devices, dtype=dt)
        assert torch.equal(c1(x1), F.conv1d(x1, c1.weight, c1.bias))
        x2 = torch.randn(2, 4, 5, 5, device=devices, dtype=dt)
        assert torch.equal(c2(x2), F.conv2d(x2, c2.weight, c2.bias))
        tok = torch.randint(0, 40, (3, 7), device=devices)
        assert torch.equal(emb(tok), F.embedding(tok, emb.weight))
        assert emb(tok).dtype == dt and emb.weight.dtype == dt
        assert torch.equal(emb.weight.cpu(), exact[id(emb)].to(dt))  # rounded once
    with pytest.raises(IndexError):
        emb(torch.tensor([[0, 40]], device=devices))
    with pytest.raises(IndexError):
        emb(torch.tensor([-1], device=devices))


def test_modules_hold_no_dense_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.Embedding(100, 64), nn.Conv1d(4, 8, 3))
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=4, max_iter=5))
    lin, emb, conv = model
    lin(torch.randn(2, 256))
    emb(torch.tensor([1, 2]))
    conv(torch.randn(1, 4, 10))
    for m in model:
        assert "weight" not in dict(m.named_parameters()) and "weight" not in m.state_dict()
        tensors = {k: v for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)}
        assert not tensors  # nothing cached beside the buffers
        resident = sum(b.numel() * b.element_size() for b in m.buffers())
        packed = m.weight_packed.numel() + m.weight_codebook.numel() * m.weight_codebook.element_size()
        assert resident == packed
        assert m.weight_packed.dtype == torch.uint8 and "weight_packed" in dict(m.named_buffers())
    assert lin.weight_packed.shape == (128, row_bytes(256, 4))
    # 4 bits per weight plus per-row fp16 codebooks, about 8x below the dense float32 weight
    assert lin.weight_packed.numel() + lin.weight_codebook.numel() * 2 < 256 * 128 * 4 / 6


def test_tied_lm_head_keeps_the_padding_row_exact():
    # an Embedding with padding_idx tied to the output Linear: the exact padding row is one
    # output column of the Linear, computed exactly as x @ row + bias
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32, padding_idx=7), nn.Linear(32, 50))
    with torch.no_grad():
        model[0].weight[7] = torch.linspace(-3, 3, 32)
    model[1].weight = model[0].weight
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=2, max_iter=5))
    emb, head = model
    assert head.palette.padding_rows == (7,) and head.weight_packed is emb.weight_packed
    x = torch.randn(4, 32)
    y = head(x)
    assert torch.equal(y[:, 7], F.linear(x, head.weight_padding, head.bias[7:8])[:, 0])
    assert_linear_close(y, x, head.weight.double(), head.bias, torch.float32)
    tok = torch.tensor([[7, 1, 7, 49]])
    e = emb(tok)
    assert torch.equal(e[0, 0], torch.linspace(-3, 3, 32)) and torch.equal(e, F.embedding(tok, emb.weight))
    assert torch.equal(head.weight[7], torch.linspace(-3, 3, 32))


def test_embedding_max_norm_renormalizes_like_the_dense_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8, max_norm=0.5))
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=3, max_iter=5))
    tok = torch.tensor([1, 2, 3])
    w = model[0].weight
    assert torch.equal(model[0](tok), F.embedding(tok, w.clone(), max_norm=0.5))
    assert torch.equal(model[0].weight, w)  # the packed weight is not renormalized


def test_a_float64_model_runs_the_dense_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4)).double()
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=3, max_iter=5))
    x = torch.randn(2, 16, dtype=torch.float64)
    assert torch.equal(model(x), F.linear(x, model[0].weight, model[0].bias))


def test_palettized_linear_inside_a_model_being_finetuned():
    # gradients reach the activations and the dense layers around a palettized one; the packed
    # weight is a buffer and gets none
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=4, max_iter=5),
                      filter_fn=lambda m, n: n == "2")
    x = torch.randn(16, 8)
    model(x).pow(2).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[2].bias.grad is not None
    dense = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    dense.load_state_dict({**{k: v for k, v in model.state_dict().items() if "weight_" not in k},
                           "2.weight": model[2].weight})
    dense(x).pow(2).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, dense[0].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[2].bias.grad, dense[2].bias.grad, rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip_runs_the_same(tmp_path):
    pytest.importorskip("safetensors")
    m = _mlp(4, "per_group", 8)
    path = tmp_path / "m.safetensors"
    popcomp.save(m, path)
    fresh = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 8))
    popcomp.load(fresh, path)
    for a, b in zip(m.state_dict().values(), fresh.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(3, 48)
    assert torch.equal(fresh(x), m(x))


def test_hutchinson_hessian_through_a_palettized_layer():
    # a palettized layer inside a model whose Hessian diagonal is estimated: the double backward
    # of Hutchinson's probes runs through the op; the dense layers' estimates match the model
    # with the palettized layer replaced by its dequantized dense twin
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    popcomp.quantize_(model, popcomp.PalettizeConfig(bits=3, max_iter=5), filter_fn=lambda m, n: n == "2")
    dense = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    dense.load_state_dict({**{k: v for k, v in model.state_dict().items() if "weight_" not in k},
                           "2.weight": model[2].weight})
    dense[2].weight.requires_grad_(False)
    X, Y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    kw = dict(method="hutchinson", seed=0, progress=False)
    h = popcomp.hessian.diagonal(model, nn.CrossEntropyLoss(), [(X, Y)], **kw)
    hd = popcomp.hessian.diagonal(dense, nn.CrossEntropyLoss(), [(X, Y)], **kw)
    assert set(h) == {"0.weight", "0.bias", "2.bias", "4.weight", "4.bias"} == set(hd)
    for k in h:
        torch.testing.assert_close(h[k], hd[k], rtol=1e-4, atol=1e-6)


def test_compile_of_palettized_embedding_and_conv_has_no_graph_break():
    torch._dynamo.reset()
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = nn.Embedding(30, 8, padding_idx=0), nn.Conv1d(8, 6, 3)
            self.fc = nn.Linear(6, 4)

        def forward(self, tok):
            return self.fc(self.conv(self.emb(tok).transpose(1, 2)).relu().mean(-1))

    net = popcomp.quantize_(Net(), popcomp.PalettizeConfig(bits=2, max_iter=5))
    tok = torch.randint(0, 30, (3, 9))
    cnet = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cnet(tok), net(tok), rtol=1e-6, atol=1e-6)
