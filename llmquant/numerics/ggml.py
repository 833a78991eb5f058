"""llama.cpp's GGUF block formats as vectorized torch codecs (CPU or CUDA).

The encoders redo ggml-quants.c's reference quantizers (and, given an importance vector, its
imatrix variants) step by step in float32 with C's evaluation order: every product and quotient
is rounded where C rounds it, sums accumulate position by position as C's loops do, rounding to
an integer copies `nearest_int`'s bit trick, and the searches keep C's candidate order and
strict comparisons. The K-quant searches choose between nearly equal errors, so anything looser
(a pairwise torch.sum, a reciprocal instead of a division, torch's CPU float32 sqrt) flips some
choices. Python loops run over positions inside a block and over search candidates (fixed
counts, at most 256), over the columns of a row for the one row-wide sum of the 32-weight imatrix
variants, and over chunks of rows to bound memory; each step covers every block of the chunk.
Tensors inside the searches are position-first, [positions, *blocks], so the sequential sums read
contiguous slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..errors import UserError

QK_K = 256
_GROUP_MAX_EPS = 1e-15  # ggml-quants.c GROUP_MAX_EPS: below this a group counts as all zero


# ---------------------------------------------------------------- float32 arithmetic as C does it

def _f32(value: float) -> float:
    """A constant rounded to float32 the way a C `float` expression would hold it."""
    return float(np.float32(value))


def _div(a, b) -> torch.Tensor:
    """IEEE float32 a / b. A Python number on either side becomes a full tensor first: torch turns
    `number / tensor` into a reciprocal times the number, and CUDA divides by a CPU scalar the
    same way, both a rounding away from C."""
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (add 1.5·2^23, keep the mantissa): round half to even, and the same
    bits as C outside its |v| <= 2^22 range, NaN and inf included. Returned as float32."""
    bits = (v + 12582912.0).view(torch.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).to(torch.float32)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf. floor(|v| + 0.5) would be wrong: the addition itself can round up."""
    whole = torch.trunc(v)
    return whole + torch.where((v - whole).abs() >= 0.5, torch.sign(v), 0.0)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (C sqrtf). torch's CPU float32 sqrt is off by an ulp about
    one time in five; the float64 root rounded to float32 is exact."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def _f16(v: torch.Tensor) -> torch.Tensor:
    """Through ggml_fp16_t and back (GGML_FP32_TO_FP16 rounds to nearest even, as torch does)."""
    return v.to(torch.float16).to(torch.float32)


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in order, in float32, from 0: a C accumulation loop."""
    t = t.contiguous()
    acc = t[0] + 0.0
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _first_absmax(x: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude along dim 0, the first one on ties, +0.0 if all are
    zero: C's `max = 0; if (amax < fabsf(v)) ...`."""
    v = x.gather(0, x.abs().argmax(0, keepdim=True))[0]
    return torch.where(v != 0, v, 0.0)


def _first_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    """min along dim as C's `if (v < min) min = v` finds it: the first of equals, so a -0.0 or
    +0.0 keeps the sign of whichever zero came first (it reaches the fp16 bytes)."""
    return x.gather(dim, x.argmin(dim, keepdim=True)).squeeze(dim)


def _first_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max along dim, the first of equals (see _first_min)."""
    return x.gather(dim, x.argmax(dim, keepdim=True)).squeeze(dim)


def _positive_max(v: torch.Tensor, dim: int) -> torch.Tensor:
    """C's `m = 0; if (v > m) m = v`: +0.0 unless some v is positive (clamp_min would keep a -0.0)."""
    m = v.amax(dim)
    return torch.where(m > 0, m, 0.0)


# ---------------------------------------------------------------- the searches (make_*_quants)

def _make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None):
    """make_qx_quants with rmse_type 1: symmetric levels -nmax..nmax-1 and a weighted least-squares
    scale, trying 18 scale nudges. x [n, ...]; weights default to x². Returns (scale [...],
    levels + nmax [n, ...]); an all-zero group gives scale 0 and levels 0."""
    vmax = _first_absmax(x)
    zero = vmax.abs() < _GROUP_MAX_EPS
    vmax = torch.where(zero, 1.0, vmax)
    w = x * x if weights is None else weights
    wx = w * x

    def fit(numerator: float):
        levels = _nearest_int(_div(numerator, vmax) * x).clamp(-nmax, nmax - 1)
        sumlx, suml2 = _seq_sum(torch.stack([wx * levels, w * levels * levels], 1)).unbind(0)
        return levels, sumlx, suml2

    levels, sumlx, suml2 = fit(-float(nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, c_lx, c_l2 = fit(-_f32(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
        better = (c_l2 > 0) & (c_lx * c_lx > best * c_l2)
        levels = torch.where(better, cand, levels)
        scale = torch.where(better, c_lx / c_l2, scale)
        best = torch.where(better, scale * c_lx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, levels + nmax)


def _make_q3_quants(x: torch.Tensor):
    """make_q3_quants(nmax 4, do_rmse): levels -4..3 fitted with x² weights, then up to 5
    coordinate-descent passes. A pass that changes nothing leaves the state as it was, so running
    all 5 for every group equals C's early exit. Returns (scale, levels + 4) like _make_qx_quants."""
    nmax = 4
    vmax = _first_absmax(x)
    zero = vmax.abs() < _GROUP_MAX_EPS
    vmax = torch.where(zero, 1.0, vmax)
    w = x * x
    wx = w * x
    levels = _nearest_int(_div(-float(nmax), vmax) * x).clamp(-nmax, nmax - 1).contiguous()
    sumlx, suml2 = _seq_sum(torch.stack([wx * levels, w * levels * levels], 1)).unbind(0)
    for _ in range(5):
        for i in range(x.shape[0]):
            xi, wi, wxi, li = x[i], w[i], wx[i], levels[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = _nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            ok = (slx > 0) & (new != li)
            slx = slx + wxi * new
            sl2 = sl2 + wi * new * new
            take = ok & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, levels + nmax)


def _make_qkx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool):
    """make_qkx2_quants / make_qkx3_quants (identical for finite input once weights are given):
    levels 0..nmax with scale and offset, searching nstep+1 scales. Each accepted candidate moves
    `min`, which the next candidates start from, so the candidates run in order. x, w [n, ...].
    Returns (scale, the_min = -offset, levels)."""
    vmin = _first_min(x, 0)
    vmin = torch.where(vmin > 0, 0.0, vmin)
    vmax = _first_max(x, 0)
    flat = vmax == vmin   # all zero, or all one negative value: levels 0, scale 0
    sum_w, sum_x = _seq_sum(torch.stack([w, w * x], 1)).unbind(0)

    def error(scale, offset, levels):
        diff = scale * levels + offset - x
        return _seq_sum(w * (diff.abs() if use_mad else diff * diff))

    span = torch.where(flat, 1.0, vmax - vmin)
    iscale = _div(float(nmax), span)
    scale = _div(1.0, iscale)
    levels = _nearest_int(iscale * (x - vmin)).clamp(0, nmax)
    best = error(scale, vmin, levels)
    for step in range(nstep + 1):
        numerator = _f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        cand = _nearest_int(_div(numerator, torch.where(flat, 1.0, vmax - vmin)) * (x - vmin)).clamp(0, nmax)
        wl = w * cand
        sum_l, sum_l2, sum_xl = _seq_sum(torch.stack([wl, wl * cand, wl * x], 1)).unbind(0)
        det = sum_w * sum_l2 - sum_l * sum_l
        c_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        c_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clip = c_min > 0
        c_min = torch.where(clip, 0.0, c_min)
        c_scale = torch.where(clip, sum_xl / sum_l2, c_scale)
        c_err = error(c_scale, c_min, cand)
        take = (det > 0) & (c_err < best) & ~flat
        levels = torch.where(take, cand, levels)
        best = torch.where(take, c_err, best)
        scale = torch.where(take, c_scale, scale)
        vmin = torch.where(take, c_min, vmin)
    return torch.where(flat, 0.0, scale), -vmin, levels


def _make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor):
    """make_qp_quants: non-negative levels 0..nmax for the sub-block scales (or mins) of the imatrix
    K-quants, weighted by each sub-block's total weight; 8 scale nudges then 5 descent passes.
    x, w [n, ...]. Returns (scale, levels)."""
    vmax = _positive_max(x, 0)
    zero = vmax < _GROUP_MAX_EPS
    vmax = torch.where(zero, 1.0, vmax)
    wx = w * x

    def mse(iscale, levels):
        diff = x - _div(1.0, iscale) * levels
        return _seq_sum(w * diff * diff)

    iscale = _div(float(nmax), vmax)
    best = mse(iscale, _nearest_int(iscale * x))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        c_iscale = _div(_f32(np.float32(0.1) * np.float32(step) + np.float32(nmax)), vmax)
        c_mse = mse(c_iscale, _nearest_int(c_iscale * x).clamp_max(nmax))
        take = c_mse < best
        best = torch.where(take, c_mse, best)
        iscale = torch.where(take, c_iscale, iscale)
    levels = _nearest_int(iscale * x).clamp_max(nmax).contiguous()
    sumlx, suml2 = _seq_sum(torch.stack([wx * levels, w * levels * levels], 1)).unbind(0)
    for _ in range(5):
        for i in range(x.shape[0]):
            xi, wi, wxi, li = x[i], w[i], wx[i], levels[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = _nearest_int(xi * sl2 / slx).clamp_max(nmax)
            slx = slx + wxi * new
            sl2 = sl2 + wi * new * new
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, levels)


# ---------------------------------------------------------------- byte layouts

def _u8(v: torch.Tensor) -> torch.Tensor:
    """Integer-valued float or int tensor -> uint8 with C's wrap-around (uint8_t l = int)."""
    return (v.to(torch.int64) & 0xFF).to(torch.uint8)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """[...] float32 -> [..., 2] little-endian ggml_fp16_t bytes."""
    return v.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def _read_half(raw: torch.Tensor, at: int) -> torch.Tensor:
    """[..., bytes] -> [..., 1] float32 from the fp16 at byte offset `at`."""
    return raw[..., at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., k, 8] values 0/1 (int64) -> [..., k] bytes, element j at bit j."""
    return (bits << torch.arange(8, device=bits.device)).sum(-1).to(torch.uint8)


def _unpack_bits(raw: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., k * 8] bits as int64."""
    return ((raw.to(torch.int64)[..., None] >> torch.arange(8, device=raw.device)) & 1).flatten(-2)


def _pack_crumbs(levels: torch.Tensor) -> torch.Tensor:
    """[..., 256] 2-bit values -> [..., 64]: byte 32h+l holds values 128h+32k+l at bits 2k (Q2_K/Q3_K qs)."""
    parts = levels.to(torch.int64).reshape(*levels.shape[:-1], 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=levels.device).view(4, 1)
    return (parts << shifts).sum(-2).to(torch.uint8).flatten(-2)


def _unpack_crumbs(raw: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_crumbs, as int64."""
    shifts = torch.tensor([0, 2, 4, 6], device=raw.device).view(4, 1)
    parts = raw.to(torch.int64).reshape(*raw.shape[:-1], 2, 1, 32)
    return ((parts >> shifts) & 3).flatten(-3)


def _pack_nibble_pairs(levels: torch.Tensor, half: int) -> torch.Tensor:
    """[..., 2·half·k] -> [..., half·k]: in each run of 2·half values, value l goes to the low nibble
    of byte l and value l+half to the high nibble (Q4_0 with half 16; Q4_K/Q5_K qs with half 32)."""
    v = levels.to(torch.int64).reshape(*levels.shape[:-1], -1, 2, half) & 0xF
    return (v[..., 0, :] | (v[..., 1, :] << 4)).to(torch.uint8).flatten(-2)


def _unpack_nibble_pairs(raw: torch.Tensor, half: int) -> torch.Tensor:
    """Inverse of _pack_nibble_pairs, as int64."""
    v = raw.to(torch.int64).reshape(*raw.shape[:-1], -1, 1, half)
    return (torch.cat([v & 0xF, v >> 4], -2)).flatten(-3)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K scales[12] from 8 scales and 8 mins (uint8 values, 6 bits meant; wider values
    spill as C's ORs spill them): bytes 0-3 scales 0-3, 4-7 mins 0-3, 8-11 low nibbles of
    scale|min 4-7, their top 2 bits in bits 6-7 of bytes 0-3 / 4-7."""
    ls = ls.to(torch.int64)
    lm = lm.to(torch.int64)
    lo = torch.cat([ls[..., :4] | ((ls[..., 4:] >> 4) << 6), lm[..., :4] | ((lm[..., 4:] >> 4) << 6)], -1)
    hi = (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)
    return (torch.cat([lo, hi], -1) & 0xFF).to(torch.uint8)


def _unpack_k4_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for all 8 sub-blocks: [..., 12] -> (scales [..., 8], mins [..., 8]) int64."""
    q = raw.to(torch.int64)
    sc = torch.cat([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], -1)
    mn = torch.cat([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], -1)
    return sc, mn


def _pack_q3_scales(ls: torch.Tensor) -> torch.Tensor:
    """Q3_K scales[12] from 16 values 0..63: low nibbles of j and j+8 share byte j; bits 4-5 of
    value j go to byte 8 + j%4 at bit 2·(j/4)."""
    ls = ls.to(torch.int64)
    low = (ls[..., :8] & 0xF) | ((ls[..., 8:] & 0xF) << 4)
    top = ((ls >> 4) & 3).reshape(*ls.shape[:-1], 4, 4) << torch.tensor([0, 2, 4, 6], device=ls.device).view(4, 1)
    return torch.cat([low, top.sum(-2)], -1).to(torch.uint8)


def _unpack_q3_scales(raw: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_q3_scales: [..., 12] -> [..., 16] int64 in 0..63."""
    q = raw.to(torch.int64)
    low = torch.cat([q[..., :8] & 0xF, q[..., :8] >> 4], -1)
    shifts = torch.tensor([0, 2, 4, 6], device=raw.device).view(4, 1)
    top = ((q[..., 8:12].unsqueeze(-2) >> shifts) & 3).flatten(-2)
    return low | (top << 4)


def _pack_high_bits(levels: torch.Tensor, threshold: int) -> torch.Tensor:
    """[..., 256] -> [..., 32]: bit g of byte l says value 32g+l is > threshold (Q3_K hmask, Q5_K qh)."""
    high = (levels > threshold).to(torch.int64).reshape(*levels.shape[:-1], 8, 32).transpose(-1, -2)
    return _pack_bits(high)


def _unpack_high_bits(raw: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_high_bits: [..., 32] -> [..., 256] bits as int64."""
    return _unpack_bits(raw).reshape(*raw.shape[:-1], 32, 8).transpose(-1, -2).flatten(-2)


# ---------------------------------------------------------------- block formats

_CHUNK = 1 << 22  # weights per step: the searches hold about ten temporaries of a step's size


def _row_chunks(rows: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Whole rows (the imatrix paths need row statistics), about _CHUNK weights at a time."""
    step = max(1, _CHUNK // n)
    return [rows[i:i + step] for i in range(0, rows.shape[0], step)]


class BlockFormat:
    """One llama.cpp tensor type: quantize float rows to its bytes, dequantize bytes to float32.

    The integer types decode through `_affine`: weight = code * scale (+ base), one scale and base per
    run of `sub_block` weights, codes in `codes` (inclusive, signed where the type centres them). The CPU
    kernels (nn/cpu.py) take those parts as they are, without a float copy of the weight."""

    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    sub_block: ClassVar[int] = 0  # weights sharing one scale (and base); 0 for the float types
    codes: ClassVar[tuple[int, int]] = (0, 0)

    @classmethod
    def quantize(cls, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """x float [..., n] (n a multiple of block_size) -> uint8 [..., n / block_size · type_size].
        importance: per-column weights [n] (an imatrix row), for the types llama.cpp weights."""
        n = x.shape[-1]
        if n % cls.block_size:
            raise UserError(f"{cls.ggml_type.name} needs rows that are a multiple of {cls.block_size} long, got {n}")
        x = x.to(torch.float32)
        if importance is not None:
            if importance.shape != (n,):
                raise UserError(f"importance has shape {tuple(importance.shape)}, expected ({n},)")
            importance = importance.to(device=x.device, dtype=torch.float32)
        rows = x.reshape(-1, n // cls.block_size, cls.block_size)
        qw = None if importance is None else importance.reshape(n // cls.block_size, cls.block_size)
        steps = [cls._encode(chunk, None if qw is None else qw.expand_as(chunk)) for chunk in _row_chunks(rows, n)]
        out = torch.cat(steps) if steps else rows.new_empty(0, rows.shape[1], cls.type_size, dtype=torch.uint8)
        return out.reshape(*x.shape[:-1], n // cls.block_size * cls.type_size)

    @classmethod
    def dequantize(cls, data: torch.Tensor, n: int) -> torch.Tensor:
        """uint8 [..., n / block_size · type_size] -> float32 [..., n]."""
        if n % cls.block_size or data.dtype != torch.uint8 or data.shape[-1] != n // cls.block_size * cls.type_size:
            raise UserError(f"{cls.ggml_type.name} data of shape {tuple(data.shape)} and dtype {data.dtype} "
                            f"does not hold rows of {n} values")
        blocks = data.reshape(-1, n // cls.block_size, cls.type_size)
        steps = [cls._decode(chunk) for chunk in _row_chunks(blocks, n)]
        out = torch.cat(steps) if steps else torch.empty(0, device=data.device)
        return out.reshape(*data.shape[:-1], n)

    @classmethod
    def affine(cls, data: torch.Tensor, n: int, codes_dtype: torch.dtype = torch.int64,
               shift: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """uint8 rows [rows, n / block_size · type_size] -> (codes + shift as `codes_dtype` [rows, n], scale
        float32 [rows, n / sub_block], base alike or None), with dequantize(data) == codes * scale + base
        exactly (each scale and base repeated over its sub-block). Decoded a chunk of rows at a time into
        tensors allocated once: the decoders' int64 temporaries stay a chunk's size."""
        if not cls.sub_block:
            raise ValueError(f"{cls.ggml_type.name} is a float type: it has no codes")
        cls.dequantize(data[:0], n)  # the same shape checks
        rows = data.shape[0]
        codes = torch.empty(rows, n, dtype=codes_dtype, device=data.device)
        scale = torch.empty(rows, n // cls.sub_block, device=data.device)
        base, start = None, 0
        for chunk in _row_chunks(data.reshape(rows, n // cls.block_size, cls.type_size), n):
            c, s, b = cls._affine(chunk)
            end = start + chunk.shape[0]
            codes[start:end] = c.reshape(end - start, n) + shift
            scale[start:end] = s.reshape(end - start, -1)
            if b is not None:
                base = torch.empty_like(scale) if base is None else base
                base[start:end] = b.reshape(end - start, -1)
            start = end
        return codes, scale, base

    @classmethod
    def _affine(cls, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """[rows, blocks, type_size] uint8 -> codes [rows, blocks, subs, sub_block] int64, scale
        [rows, blocks, subs, 1] float32, base alike or None."""
        raise NotImplementedError

    @classmethod
    def _encode(cls, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        """x [rows, blocks, block_size] float32, qw alike or None -> [rows, blocks, type_size] uint8."""
        raise NotImplementedError

    @classmethod
    def _decode(cls, raw: torch.Tensor) -> torch.Tensor:
        """[rows, blocks, type_size] uint8 -> [rows, blocks, block_size] float32."""
        codes, scale, base = cls._affine(raw)
        values = scale * codes.float() if base is None else scale * codes.float() + base
        return values.flatten(-2)


class F32(BlockFormat):
    ggml_type = GGMLQuantizationType.F32
    block_size, type_size = 1, 4

    @classmethod
    def _encode(cls, x, qw):
        return x.contiguous().view(torch.uint8)

    @classmethod
    def _decode(cls, raw):
        return raw.contiguous().view(torch.float32)


class F16(BlockFormat):
    ggml_type = GGMLQuantizationType.F16
    block_size, type_size = 1, 2

    @classmethod
    def _encode(cls, x, qw):
        return x.to(torch.float16).view(torch.uint8)

    @classmethod
    def _decode(cls, raw):
        return raw.contiguous().view(torch.float16).to(torch.float32)


class BF16(BlockFormat):
    ggml_type = GGMLQuantizationType.BF16
    block_size, type_size = 1, 2

    @classmethod
    def _encode(cls, x, qw):
        """ggml_compute_fp32_to_bf16: NaN forced quiet with its sign and top payload kept, else
        round to nearest even."""
        u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        h = torch.where(nan, (u >> 16) | 64, (u + (0x7FFF + ((u >> 16) & 1))) >> 16)
        return torch.stack([h & 0xFF, h >> 8], -1).to(torch.uint8).flatten(-2)

    @classmethod
    def _decode(cls, raw):
        return raw.contiguous().view(torch.bfloat16).to(torch.float32)


def _row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """Σx²/n over each whole row, as the imatrix paths of the 32-weight types compute it. [rows, 1, 1]."""
    rows = x.shape[0]
    flat = x.reshape(rows, -1)
    return _div(_seq_sum((flat * flat).T), float(flat.shape[1])).view(rows, 1, 1)


def _legacy_weights(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quant_weights · sqrt(σ² + x²), the per-weight importance of quantize_row_q4_0_impl & co."""
    return qw * _sqrt(_row_sigma2(x) + x * x)


class Q8_0(BlockFormat):
    ggml_type = GGMLQuantizationType.Q8_0
    block_size, type_size = 32, 34
    sub_block, codes = 32, (-128, 127)

    @classmethod
    def _encode(cls, x, qw):
        """quantize_row_q8_0_ref; llama.cpp ignores the importance for Q8_0."""
        d = _div(x.abs().amax(-1, keepdim=True), 127.0)
        inv = torch.where(d != 0, _div(1.0, d), 0.0)
        q = _round_half_away(x * inv).to(torch.int8).view(torch.uint8)
        return torch.cat([_half_bytes(d[..., 0]), q], -1)

    @classmethod
    def _affine(cls, raw):
        return raw[..., None, 2:].contiguous().view(torch.int8).to(torch.int64), _read_half(raw, 0)[..., None], None


class _Symmetric32(BlockFormat):
    """Q4_0 and Q5_0: q = x/d + 2^(bits-1), d = (signed absmax) / -2^(bits-1)."""

    bits: ClassVar[int]

    @classmethod
    def _levels(cls, x, qw):
        half = 1 << (cls.bits - 1)
        if qw is not None:
            d, levels = _make_qx_quants(x.permute(2, 0, 1), half, _legacy_weights(x, qw).permute(2, 0, 1))
            return d, levels.permute(1, 2, 0)
        vmax = _first_absmax(x.permute(2, 0, 1))
        d = _div(vmax, -float(half))
        inv = torch.where(d != 0, _div(1.0, d), 0.0)
        levels = torch.trunc(x * inv[..., None] + (half + 0.5)).clamp_max(2 * half - 1)
        return d, levels

    @classmethod
    def _encode(cls, x, qw):
        d, levels = cls._levels(x, qw)
        return _encode_levels([_half_bytes(d)], levels, cls.bits)

    @classmethod
    def _affine(cls, raw):
        levels = _decode_levels(raw, cls.bits, 2)
        return (levels - (1 << (cls.bits - 1)))[..., None, :], _read_half(raw, 0)[..., None], None


def _encode_levels(header: list, levels: torch.Tensor, bits: int) -> torch.Tensor:
    """A 32-weight block: header bytes, then (Q5 only) the 32 fifth bits, then the low nibbles."""
    if bits == 5:
        header = [*header, _pack_bits((levels.to(torch.int64) >> 4).reshape(*levels.shape[:-1], 4, 8))]
    return torch.cat([*header, _pack_nibble_pairs(levels, 16)], -1)


def _decode_levels(raw: torch.Tensor, bits: int, header_bytes: int) -> torch.Tensor:
    levels = _unpack_nibble_pairs(raw[..., -16:], 16)
    if bits == 5:
        levels = levels | (_unpack_bits(raw[..., header_bytes:header_bytes + 4]) << 4)
    return levels


class _Affine32(BlockFormat):
    """Q4_1 and Q5_1: x ≈ d·q + m with m the block minimum."""

    bits: ClassVar[int]

    @classmethod
    def _levels(cls, x, qw):
        top = (1 << cls.bits) - 1
        if qw is not None:
            d, the_min, levels = _make_qkx_quants(x.permute(2, 0, 1), top, _legacy_weights(x, qw).permute(2, 0, 1),
                                                  -0.9, 0.05, 36, False)
            return d, -the_min, levels.permute(1, 2, 0)
        vmin, vmax = _first_min(x, -1), _first_max(x, -1)
        d = _div(vmax - vmin, float(top))
        inv = torch.where(d != 0, _div(1.0, d), 0.0)
        levels = torch.trunc((x - vmin[..., None]) * inv[..., None] + 0.5).clamp_max(top)
        return d, vmin, levels

    @classmethod
    def _encode(cls, x, qw):
        d, m, levels = cls._levels(x, qw)
        return _encode_levels([_half_bytes(d), _half_bytes(m)], levels, cls.bits)

    @classmethod
    def _affine(cls, raw):
        return _decode_levels(raw, cls.bits, 4)[..., None, :], _read_half(raw, 0)[..., None], _read_half(raw, 2)[..., None]


class Q4_0(_Symmetric32):
    ggml_type = GGMLQuantizationType.Q4_0
    block_size, type_size, bits = 32, 18, 4
    sub_block, codes = 32, (-8, 7)


class Q5_0(_Symmetric32):
    ggml_type = GGMLQuantizationType.Q5_0
    block_size, type_size, bits = 32, 22, 5
    sub_block, codes = 32, (-16, 15)


class Q4_1(_Affine32):
    ggml_type = GGMLQuantizationType.Q4_1
    block_size, type_size, bits = 32, 20, 4
    sub_block, codes = 32, (0, 15)


class Q5_1(_Affine32):
    ggml_type = GGMLQuantizationType.Q5_1
    block_size, type_size, bits = 32, 24, 5
    sub_block, codes = 32, (0, 31)


def _sub_blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """[rows, blocks, 256] -> position-first [size, rows, blocks, 256 / size]."""
    return x.reshape(*x.shape[:-1], QK_K // size, size).permute(3, 0, 1, 2).contiguous()


def _whole_blocks(levels: torch.Tensor) -> torch.Tensor:
    """Inverse of _sub_blocks."""
    return levels.permute(1, 2, 3, 0).reshape(*levels.shape[1:3], QK_K)


def _block_sigma2(x: torch.Tensor, factor: float) -> torch.Tensor:
    """factor · Σx² / 256 over each super-block, summed in order: [rows, blocks] -> broadcast to sub-blocks."""
    return _div(factor * _seq_sum((x * x).permute(2, 0, 1)), float(QK_K))[..., None]


def _requantize(x: torch.Tensor, levels: torch.Tensor, d: torch.Tensor, offset: torch.Tensor | None,
                lo: int, hi: int) -> torch.Tensor:
    """Final pass of every K-quant: with the stored (fp16) scales, levels = nearest((x + offset)/d)
    clamped; sub-blocks whose scale is 0 keep the levels the search gave. x, levels position-first;
    d, offset per sub-block."""
    target = x if offset is None else x + offset
    fresh = _nearest_int(target / torch.where(d != 0, d, 1.0)).clamp(lo, hi)
    return torch.where(d != 0, fresh - lo, levels)


class Q2_K(BlockFormat):
    ggml_type = GGMLQuantizationType.Q2_K
    block_size, type_size = 256, 84
    sub_block, codes = 16, (0, 3)

    @classmethod
    def _encode(cls, x, qw):
        xs = _sub_blocks(x, 16)
        if qw is None:   # quantize_row_q2_K_ref
            scales, mins, levels = _make_qkx_quants(xs, 3, xs.abs(), -0.5, 0.1, 15, True)
            max_scale, max_min = _positive_max(scales, -1), _positive_max(mins, -1)
            has_s, has_m = max_scale > 0, max_min > 0
            ls = torch.where(has_s[..., None], _nearest_int(_div(15.0, max_scale)[..., None] * scales), 0.0)
            lm = torch.where(has_m[..., None], _nearest_int(_div(15.0, max_min)[..., None] * mins), 0.0)
            d = torch.where(has_s, _div(max_scale, 15.0), 0.0)
            dmin = torch.where(has_m, _div(max_min, 15.0), 0.0)
        else:            # quantize_row_q2_K_impl
            w = _sub_blocks(qw, 16) * _sqrt(_block_sigma2(x, 1.0) + xs * xs)
            sw = _seq_sum(w)
            scales, mins, levels = _make_qkx_quants(xs, 3, w, -0.9, 0.05, 36, False)
            d, ls = _make_qp_quants(scales.movedim(-1, 0), 15, sw.movedim(-1, 0))
            dmin, lm = _make_qp_quants(mins.movedim(-1, 0), 15, sw.movedim(-1, 0))
            ls, lm = ls.movedim(0, -1), lm.movedim(0, -1)
        packed = (ls.to(torch.int64) & 0xFF) | ((lm.to(torch.int64) << 4) & 0xFF)
        d, dmin = _f16(d), _f16(dmin)
        levels = _requantize(xs, levels, d[..., None] * (packed & 0xF).float(),
                             dmin[..., None] * (packed >> 4).float(), 0, 3)
        return torch.cat([packed.to(torch.uint8), _pack_crumbs(_whole_blocks(levels)),
                          _half_bytes(d), _half_bytes(dmin)], -1)

    @classmethod
    def _affine(cls, raw):
        sc = raw[..., :16].to(torch.int64)
        d, dmin = _read_half(raw, 80), _read_half(raw, 82)
        dl = (d * (sc & 0xF).float()).unsqueeze(-1)
        ml = (dmin * (sc >> 4).float()).unsqueeze(-1)
        return _unpack_crumbs(raw[..., 16:80]).view(*raw.shape[:-1], 16, 16), dl, -ml


class Q3_K(BlockFormat):
    ggml_type = GGMLQuantizationType.Q3_K
    block_size, type_size = 256, 110
    sub_block, codes = 16, (-4, 3)

    @classmethod
    def _encode(cls, x, qw):
        xs = _sub_blocks(x, 16)
        if qw is None:   # quantize_row_q3_K_ref
            scales, levels = _make_q3_quants(xs)
            max_scale = _first_absmax(scales.movedim(-1, 0))
            has = max_scale != 0
            iscale = _div(-32.0, torch.where(has, max_scale, 1.0))
            ls = torch.where(has[..., None], _nearest_int(iscale[..., None] * scales).clamp(-32, 31) + 32, 0.0)
            d = torch.where(has, _div(1.0, iscale), 0.0)
        else:            # quantize_row_q3_K_impl
            w = _sub_blocks(qw, 16) * _sqrt(_block_sigma2(x, 2.0) + xs * xs)
            scales, levels = _make_qx_quants(xs, 4, w)
            d, ls = _make_qx_quants(scales.movedim(-1, 0), 32, _seq_sum(w).movedim(-1, 0))
            ls = ls.movedim(0, -1)
        d = _f16(d)
        levels = _whole_blocks(_requantize(xs, levels, d[..., None] * (ls - 32).float(), None, -4, 3))
        return torch.cat([_pack_high_bits(levels, 3), _pack_crumbs(levels.to(torch.int64) & 3),
                          _pack_q3_scales(ls), _half_bytes(d)], -1)

    @classmethod
    def _affine(cls, raw):
        d = _read_half(raw, 108)
        dl = (d * (_unpack_q3_scales(raw[..., 96:108]) - 32).float()).unsqueeze(-1)
        q = _unpack_crumbs(raw[..., 32:96]) - 4 * (1 - _unpack_high_bits(raw[..., :32]))
        return q.view(*raw.shape[:-1], 16, 16), dl, None


class _ScaleMinK(BlockFormat):
    """Q4_K and Q5_K: 8 sub-blocks of 32, x ≈ d·sc·q - dmin·m with 6-bit sc and m."""

    bits: ClassVar[int]
    ref_search: ClassVar[tuple[float, float, int]]   # rmin, rdelta, nstep of quantize_row_qN_K_ref

    @classmethod
    def _fit(cls, x, qw):
        top = (1 << cls.bits) - 1
        xs = _sub_blocks(x, 32)
        if qw is None:   # quantize_row_q4_K_ref / q5_K_ref
            av_x = _sqrt(_div(_seq_sum(xs * xs), 32.0))
            scales, mins, levels = _make_qkx_quants(xs, top, av_x + xs.abs(), *cls.ref_search, False)
            max_scale, max_min = _positive_max(scales, -1), _positive_max(mins, -1)
            inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), 0.0)
            inv_min = torch.where(max_min > 0, _div(63.0, max_min), 0.0)
            ls = _nearest_int(inv_scale[..., None] * scales)
            lm = _nearest_int(inv_min[..., None] * mins)
            ls, lm = (_u8(ls).to(torch.int64).clamp_max(63), _u8(lm).to(torch.int64).clamp_max(63))
            d, dmin = _div(max_scale, 63.0), _div(max_min, 63.0)
        else:            # quantize_row_q4_K_impl / q5_K_impl
            w = _sub_blocks(qw, 32) * _sqrt(_block_sigma2(x, 2.0) + xs * xs)
            sw = _seq_sum(w).movedim(-1, 0)
            scales, mins, levels = _make_qkx_quants(xs, top, w, -0.9, 0.05, 36, False)
            d, ls = _make_qp_quants(scales.movedim(-1, 0), 63, sw)
            dmin, lm = _make_qp_quants(mins.movedim(-1, 0), 63, sw)
            ls, lm = _u8(ls.movedim(0, -1)).to(torch.int64), _u8(lm.movedim(0, -1)).to(torch.int64)
            if cls.bits == 5:
                ls, lm = ls.clamp_max(63), lm.clamp_max(63)
        scale_bytes = _pack_k4_scales(ls, lm)
        sc, m = _unpack_k4_scales(scale_bytes)
        d, dmin = _f16(d), _f16(dmin)
        levels = _requantize(xs, levels, d[..., None] * sc.float(), dmin[..., None] * m.float(), 0, top)
        return d, dmin, scale_bytes, _whole_blocks(levels).to(torch.int64)

    @classmethod
    def _encode(cls, x, qw):
        d, dmin, scale_bytes, levels = cls._fit(x, qw)
        parts = [_half_bytes(d), _half_bytes(dmin), scale_bytes]
        if cls.bits == 5:
            parts.append(_pack_high_bits(levels, 15))
        return torch.cat(parts + [_pack_nibble_pairs(levels, 32)], -1)

    @classmethod
    def _affine(cls, raw):
        d, dmin = _read_half(raw, 0), _read_half(raw, 2)
        sc, m = _unpack_k4_scales(raw[..., 4:16])
        q = _unpack_nibble_pairs(raw[..., -128:], 32)
        if cls.bits == 5:
            q = q | (_unpack_high_bits(raw[..., 16:48]) << 4)
        dl = (d * sc.float()).unsqueeze(-1)
        ml = (dmin * m.float()).unsqueeze(-1)
        return q.view(*raw.shape[:-1], 8, 32), dl, -ml


class Q4_K(_ScaleMinK):
    ggml_type = GGMLQuantizationType.Q4_K
    block_size, type_size, bits = 256, 144, 4
    sub_block, codes = 32, (0, 15)
    ref_search = (-1.0, 0.1, 20)


class Q5_K(_ScaleMinK):
    ggml_type = GGMLQuantizationType.Q5_K
    block_size, type_size, bits = 256, 176, 5
    sub_block, codes = 32, (0, 31)
    ref_search = (-0.5, 0.1, 15)


class Q6_K(BlockFormat):
    ggml_type = GGMLQuantizationType.Q6_K
    block_size, type_size = 256, 210
    sub_block, codes = 16, (-32, 31)

    @classmethod
    def _encode(cls, x, qw):
        """quantize_row_q6_K_ref, or _impl with the importance as make_qx_quants' weights."""
        xs = _sub_blocks(x, 16)
        scales, levels = _make_qx_quants(xs, 32, None if qw is None else _sub_blocks(qw, 16))
        max_scale = _first_absmax(scales.movedim(-1, 0))
        zero = max_scale.abs() < _GROUP_MAX_EPS
        iscale = _div(-128.0, torch.where(zero, 1.0, max_scale))
        d = _f16(_div(1.0, iscale))
        sc = _nearest_int(iscale[..., None] * scales).clamp_max(127)
        levels = _whole_blocks(_requantize(xs, levels, d[..., None] * sc, None, -32, 31)).to(torch.int64)
        v = levels.reshape(*levels.shape[:-1], 2, 4, 32)
        low = v & 0xF
        ql = (low[..., :2, :] | (low[..., 2:, :] << 4)).flatten(-3)
        qh = ((v >> 4) << torch.tensor([0, 2, 4, 6], device=x.device).view(4, 1)).sum(-2).flatten(-2)
        out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), sc.to(torch.int8).view(torch.uint8),
                         _half_bytes(d)], -1)
        return torch.where(zero[..., None], 0, out).to(torch.uint8)

    @classmethod
    def _affine(cls, raw):
        ql = raw[..., :128].to(torch.int64).reshape(*raw.shape[:-1], 2, 1, 64)
        low = torch.cat([ql & 0xF, ql >> 4], -2).reshape(*raw.shape[:-1], 2, 4, 32)
        qh = raw[..., 128:192].to(torch.int64).reshape(*raw.shape[:-1], 2, 1, 32)
        high = (qh >> torch.tensor([0, 2, 4, 6], device=raw.device).view(4, 1)) & 3
        q = ((low | (high << 4)) - 32).reshape(*raw.shape[:-1], 16, 16)
        sc = raw[..., 192:208].contiguous().view(torch.int8).float()
        return q, (_read_half(raw, 208) * sc).unsqueeze(-1), None


CODECS: dict[str, type[BlockFormat]] = {
    cls.ggml_type.name: cls
    for cls in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
}

FLOAT = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}  # stored as they are


@dataclass
class BlockTensor:
    """A weight encoded in a block format: rows of bytes exactly as the GGUF file stores them."""

    type: GGMLQuantizationType
    data: torch.Tensor  # uint8 [out, in / block size * type size]
    in_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return CODECS[self.type.name].dequantize(self.data, self.in_features).to(dtype)

    def cpu(self) -> BlockTensor:
        return BlockTensor(self.type, self.data.cpu(), self.in_features)
