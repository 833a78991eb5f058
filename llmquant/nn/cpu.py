"""Packed linears on the CPU through PyTorch's int4 weight-only kernel: the weights stay packed in memory.

Packed checkpoints (`cpu_linear`) and GGUF tensors (`block_linear`, below) both become `Int4CpuLinear`:
codes with a scale and a base per group of input columns. GGUF types whose scales cover 16 columns, finer
than the kernel allows, become `GroupDequantLinear`, and a GGUF embedding table a `BlockEmbedding`.

A loaded QuantLinear holds the gptq layout; for CPU inference it is converted once, at load, into
the layout of `_weight_int4pack_mm_for_cpu`, and its gptq buffers are dropped:

- 2-, 3- and 4-bit codes are 4-bit codes: `_weight_int4pack_mm_for_cpu` computes with
  w = (q - 8) * scale + zero per group of input columns, so the grid's zero point z becomes
  zero = (8 - z) * scale, exactly the grid's (q - z) * scale (2- and 3-bit codes are first moved
  up so that z lands near 8: the zero term is rounded to bfloat16, and kept small it stays as
  exact as the scale). The kernel's group (32 to 256
  columns) must tile the checkpoint's groups; a checkpoint group of 128 over 576 columns (the
  last one 64 wide) runs as groups of 64 sharing scales.
- 8-bit codes q = 16 h + l are two 4-bit halves: the kernel runs once over the input's columns
  twice, [x, x], against [h, l] with scales 16 s and s; the zero point's share, (136 - z) s per
  group, is added in float32 from the input's group sums. That is exact up to the rounding of the
  scales to bfloat16, as fast per byte as the 4-bit case, and holds 1 byte per weight.
  (PyTorch's int8 kernel, `_weight_int8pack_mm`, has one scale per output and no zero: a group
  size took one call per group of columns, 1.2x the bf16 model's decode on the 1B shape.)

The kernel is fast only with bfloat16 inputs (a float32 input takes a path 10-30x slower, on AVX2
and AVX-512 CPUs alike), so a layer computes in bfloat16 and hands back its input's dtype. Act-order (a g_idx
whose groups are not consecutive columns) permutes the input columns once at load so that every
group is a run of columns, and each call gathers the input's columns in that order.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics.ggml import CODECS, BlockTensor
from ..numerics.grid import QuantizedWeight
from .qlinear import QuantLinear

KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
ROWS_PER_TILE = 16  # _convert_weight_to_int4pack_for_cpu packs output rows in tiles of 16
COMPUTE = torch.bfloat16


def _column_order(qw: QuantizedWeight) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(input permutation that makes groups runs of columns, or None when they already are; the
    group of each column in that order)."""
    g = qw.g_idx.long()
    if bool((g[1:] >= g[:-1]).all()):
        return None, g
    perm = torch.argsort(g, stable=True)
    return perm, g[perm]


def _run_starts(g_sorted: torch.Tensor) -> torch.Tensor:
    """The first column of every run of equal groups."""
    changes = torch.nonzero(g_sorted[1:] != g_sorted[:-1]).flatten() + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), changes])


def _tile(g_sorted: torch.Tensor, sizes) -> int | None:
    """The largest of `sizes` that tiles every run of groups and the whole row, or None."""
    k = g_sorted.numel()
    starts = _run_starts(g_sorted)
    for size in sizes:
        if k % size == 0 and bool((starts % size == 0).all()):
            return size
    return None


class Int4CpuLinear(nn.Module):
    """Weights w = code * scale + base per group of `tile` input columns, codes 0..15 in the int4 layout of
    PyTorch's CPU kernel, or 0..255 as two such halves (`wide`)."""

    def __init__(self, codes: torch.Tensor, wide: bool, scale: torch.Tensor, base: torch.Tensor, tile: int,
                 perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int):
        """codes [out, in] with columns in the packed order (`perm` gathers the input that way); scale and
        base float32 [out, in / tile]; bits is what the layer reports."""
        super().__init__()
        (self.out_features, self.in_features), self.bits, self.tile = codes.shape, bits, tile
        self.register_buffer("perm", perm)
        self.register_buffer("bias", bias)
        scale = scale.float()
        zero = base.float() + 8 * scale  # the kernel computes (q - 8) * scale + zero
        offset = None
        if wide:  # q = 16 h + l: q s + b = (h - 8) 16s + (l - 8) s + (136 s + b), over columns [x, x]
            codes = torch.cat([codes >> 4, codes & 15], 1)
            offset = (zero + 128 * scale).T.contiguous()  # up to 136 s: added in float32, bfloat16 would blur it
            zero, scale = torch.zeros_like(torch.cat([zero, zero], 1)), torch.cat([16 * scale, scale], 1)
        self.register_buffer("offset", offset)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        self.register_buffer("scale_zero", torch.stack([scale.T, zero.T], -1).to(COMPUTE).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        if self.offset is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.tile, self.scale_zero)
            return self._finish(y, x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat([rows, rows], 1), self.packed, self.tile,
                                                       self.scale_zero).float()
        y += rows.view(rows.shape[0], -1, self.tile).float().sum(-1) @ self.offset
        return self._finish(y, x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as [rows, in_features] in bfloat16, its columns in the packed weight's order."""
        rows = x.reshape(-1, self.in_features)
        if self.perm is not None:
            rows = rows.index_select(1, self.perm)
        return rows.to(COMPUTE)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, tile={self.tile}"


def cpu_linear(layer: QuantLinear) -> nn.Module | None:
    """The CPU-kernel twin of a packed layer, or None when its shape does not suit the kernel."""
    qw = layer.unpack()
    perm, g_sorted = _column_order(qw)
    tile = _tile(g_sorted, KERNEL_GROUPS)
    if tile is None or qw.out_features % ROWS_PER_TILE:
        return None
    bias = None if layer.bias is None else layer.bias.detach().clone()
    codes = qw.codes if perm is None else qw.codes[:, perm]
    zeros = qw.zeros
    if qw.bits < 4:  # codes moved up the 4-bit range so that each group's zero point sits near 8: the
        shift = (8 - zeros).clamp(0, 16 - (1 << qw.bits))  # zero term, rounded to bfloat16, stays small
        codes, zeros = codes.to(torch.int32) + shift[:, g_sorted], zeros + shift
    source = g_sorted[::tile]  # the checkpoint group of every kernel group
    scale = qw.scales[:, source].float()
    return Int4CpuLinear(codes, qw.bits == 8, scale, -zeros[:, source].float() * scale, tile, perm, bias, qw.bits)


def use_cpu_kernels(model: nn.Module) -> list[str]:
    """Swap every QuantLinear of `model` for its CPU-kernel twin, in place, one layer at a time (so the
    peak is the packed model plus one layer). Returns the names of the layers the kernel cannot take:
    they stay QuantLinear and dequantize on every call, holding no float copy."""
    kept = []
    names = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    for name in names:  # by name: a list of the modules would keep every replaced one alive to the end
        twin = cpu_linear(model.get_submodule(name))
        if twin is None:
            kept.append(name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, twin)
    return kept


GEMV_ROWS = 4  # inputs of at most this many rows (decoding) take the fused product of GroupDequantLinear


def _group_gemv(codes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor | None, rows: torch.Tensor):
    """rows [M, in] @ (codes * scale + base)^T in float32, one dot product per group: compiled, it reads each
    1-byte code once and writes no weight."""
    m, (_, groups, width) = rows.shape[0], codes.shape
    x = rows.float().view(m, 1, groups, width)
    y = ((codes.float() * x).sum(-1) * scale[..., 0].float()).sum(-1)
    if base is not None:
        y = y + (x.sum(-1) * base[..., 0].float()).sum(-1)
    return y


@functools.cache
def _compiled_gemv():
    """One compilation for every shape (about 8 s here, on the first decoding step), as fast as per-shape ones."""
    return torch.compile(_group_gemv, dynamic=True)


_GEMV = {"fused": True}  # off for the process once compiling fails (no C++ compiler, say)


class GroupDequantLinear(nn.Module):
    """Weights w = code * scale (+ base) per run of `width` input columns, for GGUF types whose scales cover
    fewer columns than the int4 kernel's smallest group (Q2_K, Q3_K, Q6_K: 16). Holds 1 byte per weight
    plus the scales, never a float copy: a few rows (decoding) go through a compiled product that reads the
    codes as they are (about 11x faster than dequantizing, here); more rows dequantize to bfloat16 per call."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor | None, bias, bits: int):
        super().__init__()
        (self.out_features, self.in_features), self.bits = codes.shape, bits
        self.width = self.in_features // scale.shape[1]
        self.register_buffer("codes", codes.to(torch.int8).view(self.out_features, -1, self.width))
        self.register_buffer("scale", scale.to(COMPUTE)[..., None])
        self.register_buffer("base", None if base is None else base.to(COMPUTE)[..., None])
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = self._fused(rows) if rows.shape[0] <= GEMV_ROWS and _GEMV["fused"] else None
        if y is None:
            w = self.codes.to(COMPUTE) * self.scale
            if self.base is not None:
                w += self.base
            y = F.linear(rows.to(COMPUTE), w.view(self.out_features, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _fused(self, rows: torch.Tensor) -> torch.Tensor | None:
        try:
            return _compiled_gemv()(self.codes, self.scale, self.base, rows)
        except Exception as err:  # noqa: BLE001 - torch.compile's failures have no common type
            _GEMV["fused"] = False
            warnings.warn(f"compiling the decode product of Q2_K/Q3_K/Q6_K layers failed ({type(err).__name__}); "
                          f"they dequantize on every call, which is slower")
            return None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, width={self.width}"


def block_linear(weight: BlockTensor, bias: torch.Tensor | None) -> nn.Module:
    """A linear computing with a GGUF tensor's blocks as they are (bit-exact parts, bfloat16 compute):
    types with 32-column scales on the int4 kernel (Q4_0, Q4_1, Q4_K; Q5_*, Q8_0 as two halves),
    the others through GroupDequantLinear."""
    fmt = CODECS[weight.type.name]
    lo, hi = fmt.codes
    bits = (hi - lo).bit_length()
    if fmt.sub_block in KERNEL_GROUPS and weight.data.shape[0] % ROWS_PER_TILE == 0:
        # the codes' middle moved to the kernel's (8, or 128 for two halves): c s + b = (c + k) s + (b - k s).
        # Centred, the halves' kernel terms stay small and the float32 offset does not cancel a large sum.
        wide = hi - lo > 15
        k = (128 if wide else 8) - (lo + hi + 1) // 2
        codes, scale, base = fmt.affine(weight.data, weight.in_features, torch.int16, k)
        base = -k * scale if base is None else base - k * scale
        return Int4CpuLinear(codes, wide, scale, base, fmt.sub_block, None, bias, bits)
    return GroupDequantLinear(*fmt.affine(weight.data, weight.in_features, torch.int8), bias, bits)


class BlockEmbedding(nn.Module):
    """An embedding table kept in its GGUF blocks: a lookup decodes only the rows it reads."""

    def __init__(self, weight: BlockTensor, dtype: torch.dtype, embed_scale: float | None = None):
        super().__init__()
        self.type, self.embedding_dim, self.dtype = weight.type, weight.in_features, dtype
        self.num_embeddings = weight.data.shape[0]
        self.embed_scale = embed_scale  # Gemma 3's scaled embedding multiplies the rows it returns
        self.register_buffer("data", weight.data)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = CODECS[self.type.name].dequantize(self.data[ids.reshape(-1)], self.embedding_dim).to(self.dtype)
        if self.embed_scale is not None:
            rows = rows * torch.tensor(self.embed_scale, dtype=self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.type.name}"
