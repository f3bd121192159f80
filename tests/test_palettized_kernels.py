"""The palettized (lookup-table) matmul kernels of csrc/palettized, below the op layer:
the C++ test tests/cpp/palettized_test.cpp (built by CMake from tests/cpp, run by ctest; every
instruction-set path of the CPU kernels against a double-precision loop over a reference
packer's indices, buffers guarded by inaccessible pages, and the CUDA kernel's index logic
emulated on the CPU), and the compiled entry points _C.palettized_linear_cpu /
_C.palettized_decode_cpu called with tensor addresses against torch (a layout-v2 packer written
here from the spec, decode by indexing, float64 matmul), with their argument checks."""
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "tests" / "cpp"


def _run(cmd, cwd=None, timeout=900):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_palettized_cpp_test(tmp_path):
    if not (CPP / "palettized_test.cpp").exists() or not (ROOT / "csrc").is_dir():
        pytest.skip("needs the source tree (tests/cpp, csrc)")
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if cmake is None or ctest is None:
        pytest.skip("needs cmake and ctest on PATH")
    cxx = next((shutil.which(n) for n in (os.environ.get("CXX"), "c++", "g++", "clang++")
                if n and shutil.which(n)), None)
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = _run([cmake, "-S", CPP, "-B", tmp_path, *generator, f"-DCMAKE_CXX_COMPILER={cxx}",
                "-DCMAKE_BUILD_TYPE=Release"])
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    made = _run([cmake, "--build", tmp_path, "--target", "palettized_test"])
    assert made.returncode == 0, made.stdout[-8000:] + made.stderr[-4000:]
    run = _run([ctest, "--output-on-failure", "--verbose", "--no-tests=error", "-R",
                "^palettized_test$"], cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr
    assert "failures 0" in run.stdout, run.stdout[-8000:]
    assert "testing portable" in run.stdout


# ---- the compiled entry points against torch ------------------------------------------------
def _core():
    from popcomp import _C  # noqa: PLC0415
    if not hasattr(_C, "palettized_linear_cpu"):
        pytest.skip("the compiled core has no palettized kernels (rebuild)")
    return _C


def _code(C, dtype):
    return C.dtype_codes[str(dtype).replace("torch.", "")]


def pack_v2(idx, bits):
    """Layout v2 from the spec: rows padded to 32 indices; per block, the pieces of `bits`
    (8 alone, else 4, 2, 1 descending, the first holding the low bits), a piece of width w being
    4w bytes with byte t holding indices t + j*4w in bits [j*w, (j+1)*w)."""
    rows, n = idx.shape
    nb = (n + 31) // 32
    full = torch.zeros(rows, nb * 32, dtype=torch.int64)
    full[:, :n] = idx
    blocks = full.view(rows, nb, 32)
    pieces = [8] if bits == 8 else [w for w in (4, 2, 1) if bits & w]
    out, shift = [], 0
    for w in pieces:
        per = 4 * w
        f = ((blocks >> shift) & ((1 << w) - 1)).view(rows, nb, 8 // w, per)
        byte = sum(f[:, :, j, :] << (j * w) for j in range(8 // w))
        out.append(byte)
        shift += w
    return torch.cat(out, dim=-1).reshape(rows, nb * 4 * bits).to(torch.uint8)


CASES = [  # bits, k, granularity (0 tensor, -1 channel, g > 0 group), in, M, cb dtype, x dtype
    (4, 16, -1, 4096 + 5, 1, torch.float32, torch.float32),
    (3, 8, -1, 100, 5, torch.float16, torch.bfloat16),
    (2, 3, 0, 33, 16, torch.float32, torch.float16),
    (4, 16, 128, 300, 3, torch.float16, torch.float32),
    (6, 50, 50, 257, 2, torch.float32, torch.float32),
    (1, 2, 7, 31, 17, torch.float16, torch.float16),
    (8, 256, 32, 96, 9, torch.float32, torch.bfloat16),
    # from 24 rows of x, the AVX-512 large-batch kernel (palettized_outer.inc)
    (4, 16, -1, 4096 + 5, 40, torch.float16, torch.float32),
    (3, 8, 128, 300, 33, torch.float32, torch.bfloat16),
    (2, 4, 0, 100, 64, torch.float16, torch.float16),
    (5, 20, 50, 257, 97, torch.float32, torch.float32),
]


@pytest.mark.parametrize("bits,k,gran,n_in,M,cbt,xt", CASES)
def test_linear_and_decode_against_torch(bits, k, gran, n_in, M, cbt, xt):
    C = _core()
    g = torch.Generator().manual_seed(bits * 1000 + n_in)
    rows = 7
    idx = torch.randint(0, k, (rows, n_in), generator=g)
    packed = pack_v2(idx, bits)
    assert packed.shape[1] == C.palettized_row_bytes(in_features=n_in, bits=bits)
    groups = math.ceil(n_in / gran) if gran > 0 else 1
    cb_rows = 1 if gran == 0 else rows if gran < 0 else rows * groups
    cb = torch.randn(cb_rows, k, generator=g).to(cbt)
    col = torch.arange(n_in)
    cbrow = (torch.zeros(rows, n_in, dtype=torch.int64) if gran == 0
             else torch.arange(rows)[:, None].expand(rows, n_in) if gran < 0
             else torch.arange(rows)[:, None] * groups + (col // gran)[None, :])
    w_ref = cb.double()[cbrow, idx]  # (rows, in)
    base = torch.randn(M, n_in + 3, generator=g).to(xt)
    x = base[:, :n_in]  # rows n_in + 3 apart
    bias = torch.randn(rows, generator=g).to(torch.float16)
    y = torch.empty(M, rows, dtype=xt)
    C.palettized_linear_cpu(
        x=x.data_ptr(), x_row_stride=x.stride(0), x_dtype=_code(C, xt), M=M,
        packed=packed.data_ptr(), codebook=cb.data_ptr(), cb_dtype=_code(C, cbt), cb_rows=cb_rows,
        bias=bias.data_ptr(), bias_dtype=_code(C, bias.dtype), y=y.data_ptr(), rows=rows,
        in_features=n_in, bits=bits, k=k, group_size=max(gran, 0), num_threads=2)
    y_ref = x.double() @ w_ref.T + bias.double()
    scale = (x.double().abs() @ w_ref.abs().T + bias.double().abs())
    eps = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[xt]
    # fp32 sums of in / 16 + 32 terms per lane (row kernels) or of blocks of 256 inputs
    # (the large-batch kernel), then the output rounding
    terms = max(n_in / 16 + 40, min(n_in, 256) + n_in / 256 + 8)
    tol = terms * 1.2e-7 * scale + eps * y_ref.abs()
    assert ((y.double() - y_ref).abs() <= tol).all(), (y.double() - y_ref).abs().max()

    ids = torch.tensor([rows - 1, 0, 3, 3], dtype=torch.int64)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = torch.empty(len(ids), n_in, dtype=out_dtype)
        C.palettized_decode_cpu(
            packed=packed.data_ptr(), codebook=cb.data_ptr(), cb_dtype=_code(C, cbt),
            cb_rows=cb_rows, row_ids=ids.data_ptr(), row_begin=0, n=len(ids), out=out.data_ptr(),
            out_dtype=_code(C, out_dtype), rows=rows, in_features=n_in, bits=bits, k=k,
            group_size=max(gran, 0), num_threads=2)
        assert torch.equal(out, w_ref[ids].to(out_dtype))
    chunk = torch.empty(3, n_in, dtype=torch.float32)
    C.palettized_decode_cpu(
        packed=packed.data_ptr(), codebook=cb.data_ptr(), cb_dtype=_code(C, cbt),
        cb_rows=cb_rows, row_ids=0, row_begin=2, n=3, out=chunk.data_ptr(),
        out_dtype=_code(C, torch.float32), rows=rows, in_features=n_in, bits=bits, k=k,
        group_size=max(gran, 0), num_threads=1)
    assert torch.equal(chunk, w_ref[2:5].float())


def test_entry_point_argument_errors():
    C = _core()
    rows, n_in, bits, k = 4, 64, 4, 16
    packed = torch.zeros(rows, C.palettized_row_bytes(in_features=n_in, bits=bits), dtype=torch.uint8)
    cb = torch.zeros(rows, k)
    x = torch.zeros(1, n_in)
    y = torch.zeros(1, rows)
    good = dict(x=x.data_ptr(), x_row_stride=n_in, x_dtype=1, M=1, packed=packed.data_ptr(),
                codebook=cb.data_ptr(), cb_dtype=1, cb_rows=rows, bias=0, bias_dtype=1,
                y=y.data_ptr(), rows=rows, in_features=n_in, bits=bits, k=k, group_size=0,
                num_threads=1)
    C.palettized_linear_cpu(**good)
    for change, name in [(dict(bits=0), "bits"), (dict(k=17), "k must"), (dict(cb_rows=3), "cb_rows"),
                         (dict(group_size=32), "cb_rows"), (dict(group_size=-1), "group_size"),
                         (dict(x_dtype=0), "x_dtype"), (dict(cb_dtype=3), "cb_dtype"),
                         (dict(x=0), r"\bx is a null"), (dict(y=0), r"\by is a null"),
                         (dict(packed=0), "packed is a null"), (dict(M=-1), r"\bM must"),
                         (dict(bias=cb.data_ptr(), bias_dtype=0), "bias_dtype")]:
        with pytest.raises(ValueError, match=name):
            C.palettized_linear_cpu(**{**good, **change})
    ids = torch.tensor([0, rows], dtype=torch.int64)
    out = torch.zeros(2, n_in)
    with pytest.raises(ValueError, match=r"row_ids\[1\]"):
        C.palettized_decode_cpu(packed=packed.data_ptr(), codebook=cb.data_ptr(), cb_dtype=1,
                                cb_rows=rows, row_ids=ids.data_ptr(), row_begin=0, n=2,
                                out=out.data_ptr(), out_dtype=1, rows=rows, in_features=n_in,
                                bits=bits, k=k, group_size=0, num_threads=1)
    with pytest.raises(ValueError, match="row_begin"):
        C.palettized_decode_cpu(packed=packed.data_ptr(), codebook=cb.data_ptr(), cb_dtype=1,
                                cb_rows=rows, row_ids=0, row_begin=3, n=2, out=out.data_ptr(),
                                out_dtype=1, rows=rows, in_features=n_in, bits=bits, k=k,
                                group_size=0, num_threads=1)
    with pytest.raises(ValueError, match="bits"):
        C.palettized_row_bytes(in_features=10, bits=9)
