"""GGUF block codecs against independent implementations.

Decoders, and the reference encoders of the 32-weight types, are compared byte for byte (or bit
for bit) with the `gguf` package. It quantizes no K-type and none of the importance (imatrix)
variants, so those are compared with `_Oracle`: a slow, literal, scalar float32 port of
ggml-quants.c, run on a few blocks only. It is a test oracle, nothing else uses it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from llmquant.errors import UserError
from llmquant.numerics import ggml as quants
from llmquant.numerics.ggml import CODECS

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
FLOATS = ["F32", "F16", "BF16"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _realistic(rows: int, n: int, seed: int) -> torch.Tensor:
    """normal(0, 0.02) weights with a few 30x outliers, a zero row, a constant row, a row of
    signed zeros, and a stretch of equal negative values."""
    g = _gen(seed)
    x = torch.randn(rows, n, generator=g) * 0.02
    x[torch.rand(rows, n, generator=g) < 0.003] *= 30
    x[0] = 0.0
    x[1] = 0.0123
    x[2] = -0.0 * torch.randn(n, generator=g)
    x[3, : n // 2] = -0.25
    return x


def _inputs(rows: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed + 1)
    return {
        "realistic": _realistic(rows, n, seed),
        "randn": torch.randn(rows, n, generator=g),
        "positive": torch.rand(rows, n, generator=g) * 3,
        "sparse": torch.randn(rows, n, generator=g) * (torch.rand(rows, n, generator=g) < 0.05),
        "tiny": torch.randn(rows, n, generator=g) * 1e-6,   # fp16 scales go subnormal
    }


def _same_floats(a, b) -> bool:
    """Bitwise equality of float32 arrays, NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return a.shape == b.shape and bool((nan == np.isnan(b)).all()) and bool(
        (a.view(np.uint32)[~nan] == b.view(np.uint32)[~nan]).all())


# ---------------------------------------------------------------- layout and validation

def test_formats_table_matches_ggml():
    assert sorted(CODECS) == sorted(LEGACY + K_TYPES + FLOATS)
    for name, fmt in CODECS.items():
        assert fmt.ggml_type == GGMLQuantizationType[name]
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[fmt.ggml_type]


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError):
        CODECS["Q4_K"].quantize(torch.zeros(2, 100))
    with pytest.raises(UserError):
        CODECS["Q4_0"].quantize(torch.zeros(2, 64), importance=torch.ones(32))
    with pytest.raises(UserError):
        CODECS["Q6_K"].dequantize(torch.zeros(2, 209, dtype=torch.uint8), 256)


@pytest.mark.parametrize("name", LEGACY + K_TYPES + FLOATS)
def test_leading_dims_and_sizes(name):
    fmt = CODECS[name]
    x = torch.randn(2, 3, 512, generator=_gen(0))
    data = fmt.quantize(x.to(torch.bfloat16))
    assert data.dtype == torch.uint8 and data.shape == (2, 3, 512 // fmt.block_size * fmt.type_size)
    assert fmt.dequantize(data, 512).shape == (2, 3, 512)
    assert torch.equal(data[1, 2], fmt.quantize(x[1, 2].to(torch.bfloat16)))


# ---------------------------------------------------------------- decoders against gguf

@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # random fp16 scales include inf and NaN
@pytest.mark.parametrize("name", LEGACY + K_TYPES + FLOATS)
def test_decoder_matches_gguf_on_random_bytes(name):
    fmt = CODECS[name]
    raw = torch.randint(0, 256, (5, 4 * fmt.type_size), dtype=torch.uint8, generator=_gen(1))
    n = 4 * fmt.block_size
    theirs = gq.dequantize(raw.numpy(), fmt.ggml_type).reshape(5, n)
    assert _same_floats(fmt.dequantize(raw, n).numpy(), theirs)


@pytest.mark.parametrize("name", LEGACY + K_TYPES)
def test_decoder_matches_gguf_on_encoded_bytes(name):
    fmt = CODECS[name]
    for x in _inputs(6, 512, seed=2).values():
        data = fmt.quantize(x)
        assert _same_floats(fmt.dequantize(data, 512).numpy(), gq.dequantize(data.numpy(), fmt.ggml_type))


@pytest.mark.parametrize("name", LEGACY + K_TYPES)
def test_affine_parts_rebuild_gguf_values(name):
    """codes * scale + base, each scale over its sub-block, is gguf's dequantization bit for bit, with
    every code inside the type's declared range (what the CPU kernels rely on)."""
    fmt = CODECS[name]
    lo, hi = fmt.codes
    for x in _inputs(6, 512, seed=3).values():
        data = fmt.quantize(x)
        codes, scale, base = fmt.affine(data, 512)
        assert codes.shape == (6, 512) and scale.shape == (6, 512 // fmt.sub_block)
        assert int(codes.min()) >= lo and int(codes.max()) <= hi
        values = scale.repeat_interleave(fmt.sub_block, 1) * codes.float()
        if base is not None:
            values = values + base.repeat_interleave(fmt.sub_block, 1)
        assert _same_floats(values.numpy(), gq.dequantize(data.numpy(), fmt.ggml_type))


# ---------------------------------------------------------------- reference encoders against gguf

def _c_signed_zeros(name: str, x: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """gguf's bytes with the fp16 zero signs that llama.cpp's C writes where gguf's differ (checked
    against the compiled C). Q4_0/Q5_0 all-zero blocks: d = (+0)/-8 = -0.0, as C's max starts at
    +0. Q4_1/Q5_1: when the block minimum is a zero, m is the first zero of the block (C keeps the
    first of equal values; np.min may return either zero), and an all-zero block has d = +0."""
    blocks = theirs.reshape(len(x), -1, CODECS[name].type_size).copy()
    xb = x.reshape(len(x), blocks.shape[1], -1)
    if name in ("Q4_0", "Q5_0"):
        blocks[(xb == 0).all(-1), 0:2] = np.array([-0.0], np.float16).view(np.uint8)
    if name in ("Q4_1", "Q5_1"):
        low = xb.min(-1)
        first_low = np.take_along_axis(xb, (xb == low[..., None]).argmax(-1)[..., None], -1)[..., 0]
        blocks[low == 0, 2:4] = first_low[low == 0].astype(np.float16).view(np.uint8).reshape(-1, 2)
        blocks[(xb == 0).all(-1), 0:2] = 0
    return blocks.reshape(len(x), -1)


@pytest.mark.parametrize("name", LEGACY + FLOATS)
def test_reference_encoder_matches_gguf_bytes(name):
    fmt = CODECS[name]
    for label, x in _inputs(8, 1024, seed=3).items():
        theirs = gq.quantize(x.numpy(), fmt.ggml_type).view(np.uint8).reshape(8, -1)
        if name in LEGACY:
            theirs = _c_signed_zeros(name, x.numpy(), theirs)
        assert np.array_equal(fmt.quantize(x).numpy(), theirs), label


def test_q8_0_rounds_half_away_from_zero():
    """x·(1/d) landing exactly on k + 0.5 must round away from zero (C roundf), not to even."""
    x = torch.zeros(1, 32)
    x[0, 0] = 127.0   # d = 1, id = 1
    x[0, 1:7] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997])
    q = CODECS["Q8_0"].quantize(x)[0, 2:].view(torch.int8)
    assert q[:7].tolist() == [127, 1, 2, 3, -1, -3, 0]
    assert np.array_equal(q.numpy().view(np.uint8), gq.quantize(x.numpy(), GGMLQuantizationType.Q8_0)[0, 2:])


# ---------------------------------------------------------------- K-types and imatrix variants against the oracle

f32 = np.float32


class _Oracle:
    """Scalar float32 port of ggml-quants.c (quantize_row_*_ref, *_impl and their make_*_quants).
    Each method takes one block (or row) as a list of np.float32 and returns what dequantizing
    llama.cpp's bytes yields, computed as dequantize_row_* computes it."""

    EPS = f32(1e-15)

    @staticmethod
    def nearest_int(v) -> int:
        bits = np.array(f32(v) + f32(12582912.0), dtype=np.float32).view(np.int32)
        return int(bits & 0x7FFFFF) - 0x400000

    @staticmethod
    def fp16(v) -> np.float32:
        return f32(np.float16(v))

    @staticmethod
    def absmax(x):
        amax, vmax = f32(0), f32(0)
        for v in x:
            if amax < abs(v):
                amax, vmax = abs(v), v
        return amax, vmax

    @classmethod
    def make_qx_quants(cls, x, nmax, qw=None):
        amax, vmax = cls.absmax(x)
        if amax < cls.EPS:
            return f32(0), [0] * len(x)
        w = [qw[i] if qw is not None else x[i] * x[i] for i in range(len(x))]

        def fit(iscale):
            ls = [max(-nmax, min(nmax - 1, cls.nearest_int(iscale * v))) for v in x]
            sumlx = suml2 = f32(0)
            for i, l in enumerate(ls):
                sumlx += w[i] * x[i] * l
                suml2 += w[i] * l * l
            return ls, sumlx, suml2

        levels, sumlx, suml2 = fit(f32(-nmax) / vmax)
        scale = sumlx / suml2 if suml2 else f32(0)
        best = scale * sumlx
        for step in range(-9, 10):
            if step:
                ls, slx, sl2 = fit(-(nmax + f32(0.1) * step) / vmax)
                if sl2 > 0 and slx * slx > best * sl2:
                    levels, scale = ls, slx / sl2
                    best = scale * slx
        return scale, [l + nmax for l in levels]

    @classmethod
    def make_q3_quants(cls, x, nmax=4):
        amax, vmax = cls.absmax(x)
        if amax < cls.EPS:
            return f32(0), [0] * len(x)
        iscale = f32(-nmax) / vmax
        L = [max(-nmax, min(nmax - 1, cls.nearest_int(iscale * v))) for v in x]
        sumlx = suml2 = f32(0)
        for i, v in enumerate(x):
            sumlx += v * v * v * L[i]
            suml2 += v * v * L[i] * L[i]
        for _ in range(5):
            changed = 0
            for i, v in enumerate(x):
                w = v * v
                slx = sumlx - w * v * L[i]
                if slx > 0:
                    sl2 = suml2 - w * L[i] * L[i]
                    new = max(-nmax, min(nmax - 1, cls.nearest_int(v * sl2 / slx)))
                    if new != L[i]:
                        slx += w * v * new
                        sl2 += w * new * new
                        if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i], sumlx, suml2 = new, slx, sl2
                            changed += 1
            if not changed:
                break
        return (sumlx / suml2 if suml2 > 0 else f32(0)), [l + nmax for l in L]

    @classmethod
    def make_qkx_quants(cls, x, nmax, w, rmin, rdelta, nstep, use_mad):
        """make_qkx2_quants and make_qkx3_quants (the same once weights are given)."""
        vmin = vmax = x[0]
        sum_w = w[0]
        sum_x = sum_w * x[0]
        for i in range(1, len(x)):
            vmin = x[i] if x[i] < vmin else vmin
            vmax = x[i] if x[i] > vmax else vmax
            sum_w += w[i]
            sum_x += w[i] * x[i]
        if vmin > 0:
            vmin = f32(0)
        if vmax == vmin:
            return f32(0), -vmin, [0] * len(x)

        def error(scale, offset, ls):
            total = f32(0)
            for i, l in enumerate(ls):
                diff = scale * l + offset - x[i]
                total += w[i] * (abs(diff) if use_mad else diff * diff)
            return total

        iscale = nmax / (vmax - vmin)
        scale = 1 / iscale
        L = [max(0, min(nmax, cls.nearest_int(iscale * (v - vmin)))) for v in x]
        best = error(scale, vmin, L)
        for step in range(nstep + 1):
            iscale = (rmin + rdelta * step + nmax) / (vmax - vmin)
            ls = [max(0, min(nmax, cls.nearest_int(iscale * (v - vmin)))) for v in x]
            sum_l = sum_l2 = sum_xl = f32(0)
            for i, l in enumerate(ls):
                sum_l += w[i] * l
                sum_l2 += w[i] * l * l
                sum_xl += w[i] * l * x[i]
            det = sum_w * sum_l2 - sum_l * sum_l
            if det > 0:
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
                if this_min > 0:
                    this_min, this_scale = f32(0), sum_xl / sum_l2
                err = error(this_scale, this_min, ls)
                if err < best:
                    L, best, scale, vmin = ls, err, this_scale, this_min
        return scale, -vmin, L

    @classmethod
    def make_qp_quants(cls, x, nmax, w):
        vmax = f32(0)
        for v in x:
            vmax = vmax if vmax > v else v
        if vmax < cls.EPS:
            return f32(0), [0] * len(x)

        def mse(iscale, clamp):
            scale, total = 1 / iscale, f32(0)
            for i, v in enumerate(x):
                l = cls.nearest_int(iscale * v)
                diff = v - scale * (min(nmax, l) if clamp else l)
                total += w[i] * diff * diff
            return total

        iscale = nmax / vmax
        best = mse(iscale, False)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            cand = (f32(0.1) * step + nmax) / vmax
            err = mse(cand, True)
            if err < best:
                best, iscale = err, cand
        L = [min(nmax, cls.nearest_int(iscale * v)) for v in x]
        sumlx = suml2 = f32(0)
        for i, v in enumerate(x):
            sumlx += w[i] * v * L[i]
            suml2 += w[i] * L[i] * L[i]
        for _ in range(5):
            changed = 0
            for i, v in enumerate(x):
                slx = sumlx - w[i] * v * L[i]
                sl2 = suml2 - w[i] * L[i] * L[i]
                if slx > 0 and sl2 > 0:
                    new = min(nmax, cls.nearest_int(v * sl2 / slx))
                    if new != L[i]:
                        slx += w[i] * v * new
                        sl2 += w[i] * new * new
                        if slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i], sumlx, suml2 = new, slx, sl2
                            changed += 1
            if not changed:
                break
        return (sumlx / suml2 if suml2 > 0 else f32(0)), L

    @staticmethod
    def total(values):
        acc = f32(0)
        for v in values:
            acc += v
        return acc

    @classmethod
    def sum_squares(cls, x):
        return cls.total([v * v for v in x])

    @classmethod
    def imatrix_weights(cls, x, qw, sigma2):
        return [qw[i] * np.sqrt(sigma2 + x[i] * x[i]) for i in range(len(x))]

    @staticmethod
    def positive_max(values):
        top = f32(0)
        for v in values:
            top = v if v > top else top
        return top

    # ---- super-blocks of 256

    @classmethod
    def q2_k(cls, x, qw):
        subs = [x[16 * j:16 * j + 16] for j in range(16)]
        if qw is None:
            fits = [cls.make_qkx_quants(s, 3, [abs(v) for v in s], f32(-0.5), f32(0.1), 15, True) for s in subs]
            scales, mins = [f[0] for f in fits], [f[1] for f in fits]
            max_scale, max_min = cls.positive_max(scales), cls.positive_max(mins)
            ls = [cls.nearest_int(15 / max_scale * s) if max_scale > 0 else 0 for s in scales]
            lm = [cls.nearest_int(15 / max_min * m) if max_min > 0 else 0 for m in mins]
            d = cls.fp16(max_scale / 15 if max_scale > 0 else 0)
            dmin = cls.fp16(max_min / 15 if max_min > 0 else 0)
        else:
            sigma2 = cls.sum_squares(x) / 256
            ws = [cls.imatrix_weights(s, qw[16 * j:16 * j + 16], sigma2) for j, s in enumerate(subs)]
            sw = [cls.total(w) for w in ws]
            fits = [cls.make_qkx_quants(s, 3, w, f32(-0.9), f32(0.05), 36, False) for s, w in zip(subs, ws)]
            dm, ls = cls.make_qp_quants([f[0] for f in fits], 15, sw)
            mm, lm = cls.make_qp_quants([f[1] for f in fits], 15, sw)
            d, dmin = cls.fp16(dm), cls.fp16(mm)
        packed = [(a & 0xFF) | ((b << 4) & 0xFF) for a, b in zip(ls, lm)]
        out = []
        for j, s in enumerate(subs):
            dl, ml = d * (packed[j] & 0xF), dmin * (packed[j] >> 4)
            levels = [max(0, min(3, cls.nearest_int((v + ml) / dl))) for v in s] if dl else fits[j][2]
            out += [dl * l - ml for l in levels]
        return out

    @classmethod
    def q3_k(cls, x, qw):
        subs = [x[16 * j:16 * j + 16] for j in range(16)]
        if qw is None:
            fits = [cls.make_q3_quants(s) for s in subs]
            _, max_scale = cls.absmax([f[0] for f in fits])
            if max_scale:
                iscale = f32(-32) / max_scale
                ls = [max(-32, min(31, cls.nearest_int(iscale * f[0]))) + 32 for f in fits]
                d = cls.fp16(1 / iscale)
            else:
                ls, d = [0] * 16, f32(0)
        else:
            sigma2 = 2 * cls.sum_squares(x) / 256
            ws = [cls.imatrix_weights(s, qw[16 * j:16 * j + 16], sigma2) for j, s in enumerate(subs)]
            sw = [cls.total(w) for w in ws]
            fits = [cls.make_qx_quants(s, 4, w) for s, w in zip(subs, ws)]
            d_block, ls = cls.make_qx_quants([f[0] for f in fits], 32, sw)
            d = cls.fp16(d_block)
        out = []
        for j, s in enumerate(subs):
            dl = d * (ls[j] - 32)
            levels = [max(-4, min(3, cls.nearest_int(v / dl))) + 4 for v in s] if dl else fits[j][1]
            out += [dl * (l - 4) for l in levels]
        return out

    @classmethod
    def q45_k(cls, x, qw, bits):
        nmax = (1 << bits) - 1
        subs = [x[32 * j:32 * j + 32] for j in range(8)]
        if qw is None:
            rmin, nstep = (f32(-1), 20) if bits == 4 else (f32(-0.5), 15)
            fits = []
            for s in subs:
                av_x = np.sqrt(cls.sum_squares(s) / 32)
                fits.append(cls.make_qkx_quants(s, nmax, [av_x + abs(v) for v in s], rmin, f32(0.1), nstep, False))
            max_scale, max_min = cls.positive_max([f[0] for f in fits]), cls.positive_max([f[1] for f in fits])
            inv_scale = 63 / max_scale if max_scale > 0 else f32(0)
            inv_min = 63 / max_min if max_min > 0 else f32(0)
            ls = [min(63, cls.nearest_int(inv_scale * f[0]) & 0xFF) for f in fits]
            lm = [min(63, cls.nearest_int(inv_min * f[1]) & 0xFF) for f in fits]
            d, dmin = cls.fp16(max_scale / 63), cls.fp16(max_min / 63)
        else:
            sigma2 = 2 * cls.sum_squares(x) / 256
            ws = [cls.imatrix_weights(s, qw[32 * j:32 * j + 32], sigma2) for j, s in enumerate(subs)]
            sw = [cls.total(w) for w in ws]
            fits = [cls.make_qkx_quants(s, nmax, w, f32(-0.9), f32(0.05), 36, False) for s, w in zip(subs, ws)]
            d_block, ls = cls.make_qp_quants([f[0] for f in fits], 63, sw)
            m_block, lm = cls.make_qp_quants([f[1] for f in fits], 63, sw)
            assert max(ls + lm) <= 63 and min(ls + lm) >= 0   # 6-bit spill-over is out of the oracle's scope
            d, dmin = cls.fp16(d_block), cls.fp16(m_block)
        out = []
        for j, s in enumerate(subs):
            dl, ml = d * ls[j], dmin * lm[j]
            levels = [max(0, min(nmax, cls.nearest_int((v + ml) / dl))) for v in s] if dl else fits[j][2]
            out += [dl * l - ml for l in levels]
        return out

    @classmethod
    def q6_k(cls, x, qw):
        subs = [x[16 * j:16 * j + 16] for j in range(16)]
        fits = [cls.make_qx_quants(s, 32, None if qw is None else qw[16 * j:16 * j + 16]) for j, s in enumerate(subs)]
        amax, max_scale = cls.absmax([f[0] for f in fits])
        if amax < cls.EPS:   # an all-zero block of bytes
            return [f32(0) * 0 * (0 - 32)] * 256
        iscale = f32(-128) / max_scale
        d = cls.fp16(1 / iscale)
        out = []
        for j, s in enumerate(subs):
            dl = d * min(127, cls.nearest_int(iscale * fits[j][0]))
            levels = [max(-32, min(31, cls.nearest_int(v / dl))) + 32 for v in s] if dl else fits[j][1]
            out += [dl * (l - 32) for l in levels]
        return out

    # ---- imatrix variants of the 32-weight types, one whole row at a time

    @classmethod
    def legacy_impl(cls, row, qw, name):
        sigma2 = cls.sum_squares(row) / len(row)
        out = []
        for b in range(0, len(row), 32):
            x, w = row[b:b + 32], cls.imatrix_weights(row[b:b + 32], qw[b:b + 32], sigma2)
            if name in ("Q4_0", "Q5_0"):
                half = 8 if name == "Q4_0" else 16
                d, levels = cls.make_qx_quants(x, half, w)
                out += [cls.fp16(d) * (l - half) for l in levels]
            else:
                d, the_min, levels = cls.make_qkx_quants(x, 15 if name == "Q4_1" else 31, w,
                                                         f32(-0.9), f32(0.05), 36, False)
                out += [cls.fp16(d) * l + cls.fp16(-the_min) for l in levels]
        return out

    @classmethod
    def quantize_dequantize(cls, name, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        rows = []
        with np.errstate(all="ignore"):
            for row in x.astype(np.float32):
                row = [f32(v) for v in row]
                if name in LEGACY:
                    rows.append(cls.legacy_impl(row, qw, name))
                    continue
                out = []
                for b in range(0, len(row), 256):
                    w = None if qw is None else [f32(v) for v in qw[b:b + 256]]
                    block = row[b:b + 256]
                    out += {"Q2_K": lambda: cls.q2_k(block, w), "Q3_K": lambda: cls.q3_k(block, w),
                            "Q4_K": lambda: cls.q45_k(block, w, 4), "Q5_K": lambda: cls.q45_k(block, w, 5),
                            "Q6_K": lambda: cls.q6_k(block, w)}[name]()
                rows.append(out)
        return np.array(rows, dtype=np.float32)


def _oracle_rows() -> torch.Tensor:
    """Four rows of 512: real-looking, with a zero sub-block, a constant run and a negative run."""
    x = _realistic(4, 512, seed=11)
    x[0] = torch.randn(512, generator=_gen(12)) * 0.02
    x[0, 16:48] = 0.0
    x[0, 300:340] = 0.031
    x[1, 100:150] = -0.004
    return x[:3]


def _importance(n: int) -> torch.Tensor:
    """Skewed imatrix-like weights with a stretch of zeros."""
    w = torch.rand(n, generator=_gen(13)) ** 3 * 10
    w[40:72] = 0.0
    return w


needs_nep50 = pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2,
                                 reason="the oracle's float32 scalar arithmetic needs NumPy 2 promotion rules")


@needs_nep50
@pytest.mark.parametrize("name", K_TYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["ref", "imatrix"])
def test_k_type_matches_literal_port(name, weighted):
    fmt = CODECS[name]
    x = _oracle_rows()
    qw = _importance(x.shape[1]) if weighted else None
    ours = fmt.dequantize(fmt.quantize(x, qw), x.shape[1]).numpy()
    expected = _Oracle.quantize_dequantize(name, x.numpy(), None if qw is None else qw.numpy())
    assert _same_floats(ours, expected)


@needs_nep50
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_imatrix_variant_matches_literal_port(name):
    fmt = CODECS[name]
    x = _oracle_rows()[:, :256]
    qw = _importance(256)
    ours = fmt.dequantize(fmt.quantize(x, qw), 256).numpy()
    assert _same_floats(ours, _Oracle.quantize_dequantize(name, x.numpy(), qw.numpy()))


# ---------------------------------------------------------------- behaviour

@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q3_K", "Q5_K", "BF16"])
def test_chunked_rows_give_the_same_bytes(name, monkeypatch):
    fmt = CODECS[name]
    x = _realistic(12, 512, seed=10)
    qw = torch.rand(512, generator=_gen(10))
    whole = [fmt.quantize(x), fmt.quantize(x, qw)]
    decoded = fmt.dequantize(whole[0], 512)
    monkeypatch.setattr(quants, "_CHUNK", 1200)   # 2 rows per step
    assert all(torch.equal(a, b) for a, b in zip(whole, [fmt.quantize(x), fmt.quantize(x, qw)]))
    assert torch.equal(fmt.dequantize(whole[0], 512), decoded)


@pytest.mark.parametrize("name", LEGACY + K_TYPES)
def test_zero_rows_decode_to_zero(name):
    fmt = CODECS[name]
    x = torch.zeros(2, 512)
    for qw in (None, torch.rand(512, generator=_gen(4))):
        assert torch.equal(fmt.dequantize(fmt.quantize(x, qw), 512), x)


def test_error_falls_with_bits():
    x = _realistic(16, 1024, seed=5)[4:]

    def rel_err(name):
        fmt = CODECS[name]
        return float(((fmt.dequantize(fmt.quantize(x), 1024) - x) ** 2).sum() / (x ** 2).sum())

    errs = [rel_err(name) for name in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]]
    assert errs == sorted(errs, reverse=True)
    assert errs[0] < 0.2 and errs[-1] < 1e-3
    assert rel_err("Q4_0") > rel_err("Q4_1") > rel_err("Q5_0") > rel_err("Q5_1") > rel_err("Q8_0")


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_importance_lowers_the_weighted_error(name):
    """The imatrix variants minimise importance-weighted error, so with skewed importance they
    must beat the unweighted reference on that measure."""
    fmt = CODECS[name]
    x = torch.randn(32, 512, generator=_gen(6)) * 0.02
    qw = torch.rand(512, generator=_gen(7)) ** 4 * 100

    def weighted_err(importance):
        return float((((fmt.dequantize(fmt.quantize(x, importance), 512) - x) ** 2) * qw).sum())

    assert weighted_err(qw) < weighted_err(None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", LEGACY + K_TYPES + FLOATS)
def test_cuda_matches_cpu(name):
    fmt = CODECS[name]
    x = _realistic(64, 1024, seed=8)
    qw = torch.rand(1024, generator=_gen(9))
    for importance in (None, qw):
        cpu = fmt.quantize(x, importance)
        cuda = fmt.quantize(x.cuda(), None if importance is None else importance.cuda())
        assert torch.equal(cuda.cpu(), cpu)
        assert _same_floats(fmt.dequantize(cuda, 1024).cpu().numpy(), fmt.dequantize(cpu, 1024).numpy())
