"""Bit packing of integer codes into int32 words, vectorized (no loops over rows or columns).

Every layout here is a little-endian bit stream: along the packed dimension, code j occupies
bits [bits*j, bits*j + bits) of a stream cut into 32-bit words. For 2/4/8 bits a word holds
32/bits whole codes; for 3 bits, 32 codes fill 3 words and two codes straddle word boundaries
(the "10-1-10-1-10" pattern of the gptq layout). The awq layout first permutes the codes within
each block of 8 output columns (AWQ_ORDER), then packs them the same way.
"""

from __future__ import annotations

import torch

from .grid import QuantizedWeight, default_g_idx

# AWQ GEMM: nibble i of each word holds output column AWQ_ORDER[i] of its block of 8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_INVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def _word_shifts(per: int, bits: int, dim: int, device) -> torch.Tensor:
    """Bit offsets of the codes in a word, shaped to broadcast along a per-word axis after `dim` (2-D)."""
    shifts = torch.arange(per, device=device, dtype=torch.int32) * bits
    return shifts.view(per, *([1] * (1 - dim)))


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack a 2-D tensor of codes in [0, 2^bits) into int32 words along `dim` (0 or 1)."""
    n = codes.shape[dim]
    if n * bits % 32:
        raise ValueError(f"cannot pack {n} {bits}-bit codes into whole 32-bit words")
    x = codes.to(torch.int64)
    if 32 % bits == 0:  # whole codes per word: shift each into place and add
        per = 32 // bits
        x = x.unflatten(dim, (n // per, per))
        packed = (x << _word_shifts(per, bits, dim, x.device)).sum(dim + 1)
    else:  # 3 bits: codes straddle words, go through the little-endian bit stream
        shifts = torch.arange(bits, device=x.device)
        stream = ((x.movedim(dim, -1)[..., None] >> shifts) & 1).flatten(-2).unflatten(-1, (-1, 32))
        packed = (stream << torch.arange(32, device=x.device)).sum(-1).movedim(-1, dim)
    return (packed - ((packed >= 1 << 31).to(torch.int64) << 32)).to(torch.int32).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, n: int | None = None) -> torch.Tensor:
    """Codes (uint8) from int32 words packed along `dim` (0 or 1); n is the unpacked length."""
    length = words.shape[dim] * 32 // bits
    n = length if n is None else n
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = _word_shifts(per, bits, dim, words.device)
        codes = ((words.unsqueeze(dim + 1) >> shifts) & mask).flatten(dim, dim + 1)
    else:
        pos = torch.arange(32, device=words.device, dtype=torch.int32)
        stream = ((words.movedim(dim, -1)[..., None] >> pos) & 1).flatten(-2).unflatten(-1, (-1, bits))
        codes = (stream << torch.arange(bits, device=words.device, dtype=torch.int32)).sum(-1).movedim(-1, dim)
    return codes.narrow(dim, 0, n).to(torch.uint8).contiguous()


# checkpoint_format -> what a stored zero point lacks: v1 ("gptq", AutoGPTQ's convention) stores zero - 1,
# so an asymmetric zero of 0 wraps to 2^bits - 1 and reads back as 2^bits; v2 stores the zero itself
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


def pack_gptq(qw: QuantizedWeight, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """The gptq tensors of one linear: codes packed along the input dimension, zeros stored as
    zero - zero_offset (see ZERO_OFFSETS) and packed along the output dimension, scales float16 [groups, out]."""
    maxq = (1 << qw.bits) - 1
    stored = (qw.zeros - zero_offset) & maxq
    return {
        "qweight": pack_int32(qw.codes.T, qw.bits, dim=0),
        "qzeros": pack_int32(stored.T, qw.bits, dim=1),
        "scales": qw.scales.T.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                zero_offset: int = 1) -> QuantizedWeight:
    """Exact inverse of pack_gptq (zero = stored + zero_offset)."""
    out_features = tensors["qweight"].shape[1]
    in_features = tensors["g_idx"].shape[0]
    codes = unpack_int32(tensors["qweight"], bits, dim=0, n=in_features).T
    zeros = unpack_int32(tensors["qzeros"], bits, dim=1, n=out_features).to(torch.int32) + zero_offset
    return QuantizedWeight(codes.contiguous(), tensors["scales"].float().T.contiguous(), zeros.T.contiguous(),
                           tensors["g_idx"].to(torch.int32), bits, group_size, sym)


def _awq_columns(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Permute the columns of x [rows, out] within each block of 8."""
    return x.unflatten(1, (-1, 8))[:, :, list(order)].flatten(1)


def pack_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one linear: codes [in, out] and raw zeros [groups, out], both packed along
    the output dimension in AWQ's interleaved nibble order; scales float16 [groups, out]. 4-bit only, and
    no g_idx: groups must be consecutive input columns."""
    if qw.bits != 4:
        raise ValueError(f"the awq layout stores 4-bit codes, not {qw.bits}-bit")
    if not torch.equal(qw.g_idx.cpu(), default_g_idx(qw.in_features, qw.group_size)):
        raise ValueError("the awq layout has no g_idx: groups must be consecutive input columns")
    return {
        "qweight": pack_int32(_awq_columns(qw.codes.T, AWQ_ORDER), 4, dim=1),
        "qzeros": pack_int32(_awq_columns(qw.zeros.T, AWQ_ORDER), 4, dim=1),
        "scales": qw.scales.T.to(torch.float16).contiguous(),
    }


def unpack_awq(tensors: dict[str, torch.Tensor], group_size: int, sym: bool) -> QuantizedWeight:
    """Exact inverse of pack_awq."""
    codes = _awq_columns(unpack_int32(tensors["qweight"], 4, dim=1), AWQ_INVERSE).T
    zeros = _awq_columns(unpack_int32(tensors["qzeros"], 4, dim=1), AWQ_INVERSE).T.to(torch.int32)
    return QuantizedWeight(codes.contiguous(), tensors["scales"].float().T.contiguous(), zeros.contiguous(),
                           default_g_idx(codes.shape[1], group_size), 4, group_size, sym)
