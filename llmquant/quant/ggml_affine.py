"""Any GGUF block format seen as an affine integer grid: value = a * code + b per weight.

Every llama.cpp type stores, for each weight, an unsigned code spread over some bits of its block
(low nibbles here, a high bit there) and block parameters (d, dmin, sub-block scales) elsewhere;
decoding is affine in the code. Instead of re-describing ten bit layouts, `LevelBits` learns
each one from our decoder: flipping a bit that moves exactly one weight is a code bit (its
weight in the code follows from how far the value moved); any other bit is a parameter. With
that map a block's codes can be rewritten in place, and the block's a and b read off by
decoding codes 0 and 1. tests/test_block_grid.py checks the maps against every format.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..numerics.ggml import CODECS, BlockFormat


@dataclass(frozen=True)
class LevelBits:
    byte: torch.Tensor  # [P] byte of each code bit within the block
    bit: torch.Tensor  # [P] its bit within that byte
    position: torch.Tensor  # [P] the weight it belongs to
    shift: torch.Tensor  # [P] its place in that weight's code
    invert: torch.Tensor  # [P] 1 where the stored bit is the code bit's complement (Q8_0's int8 sign bit)
    cmax: int  # largest code
    mask: torch.Tensor  # [type_size] uint8: the code bits of each byte

    def codes(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 [..., type_size] -> int64 codes [..., block_size]."""
        bits = ((raw[..., self.byte].long() >> self.bit) & 1) ^ self.invert
        out = torch.zeros(*raw.shape[:-1], int(self.position.max()) + 1, dtype=torch.long, device=raw.device)
        return out.index_add_(-1, self.position, bits << self.shift)

    def with_codes(self, raw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """raw with its codes replaced by `codes` (int [..., block_size]); parameters untouched."""
        bits = ((codes[..., self.position].long() >> self.shift) & 1) ^ self.invert
        packed = torch.zeros(raw.shape, dtype=torch.long, device=raw.device)
        packed.index_add_(-1, self.byte, bits << self.bit)
        return (raw & ~self.mask.to(raw.device)) | packed.to(torch.uint8)


@functools.cache
def level_bits(name: str) -> LevelBits:
    fmt = CODECS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, fmt.block_size, generator=gen) * torch.rand(8, fmt.block_size, generator=gen)
    raw = fmt.quantize(x)  # [8, type_size]: real blocks, every scale non-zero
    base = fmt.dequantize(raw, fmt.block_size)
    nbits = fmt.type_size * 8
    flips = raw.unsqueeze(0).repeat(nbits, 1, 1)  # [bit, row, byte]
    idx = torch.arange(nbits)
    flips[idx, :, idx // 8] ^= (1 << (idx % 8)).to(torch.uint8)[:, None]
    delta = fmt.dequantize(flips.reshape(-1, fmt.type_size), fmt.block_size).reshape(nbits, 8, -1) - base
    moved = delta != 0  # NaN (a flipped float exponent) counts as moved
    single = (moved.sum(-1) == 1).all(-1)  # this bit moves exactly one weight, in every probe row
    position = moved[:, 0].float().argmax(-1)
    single &= (moved.float().argmax(-1) == position[:, None]).all(-1)
    step = delta.abs().amax(-1).amax(-1)  # |a| * 2^shift in the row with the largest |a|
    # which way setting the bit moves the value (row 0): against the weight's lowest bit = a complemented bit
    was_set = (raw[0, idx // 8].long() >> (idx % 8)) & 1
    rise = torch.sign(delta[idx, 0, position]) * (1 - 2 * was_set)
    byte, bit, position, step, rise = idx[single] // 8, idx[single] % 8, position[single], step[single], rise[single]
    unit = torch.full((fmt.block_size,), float("inf")).scatter_reduce(0, position, step, "amin")
    shift = torch.round(torch.log2(step / unit[position])).long()
    lowest_rise = torch.zeros(fmt.block_size).index_put_((position[shift == 0],), rise[shift == 0])
    invert = (rise != lowest_rise[position]).long()
    mask = torch.zeros(fmt.type_size, dtype=torch.long).index_add_(0, byte, 1 << bit).to(torch.uint8)
    cmax = int(torch.zeros(fmt.block_size, dtype=torch.long).index_add_(0, position, 1 << shift).max())
    return LevelBits(byte, bit, position, shift, invert, cmax, mask)


def affine(fmt: type[BlockFormat], raw: torch.Tensor, bits: LevelBits) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each [..., block_size]: the value of code c at each weight is a * c + b."""
    zero = fmt.dequantize(bits.with_codes(raw, torch.zeros(1, dtype=torch.long, device=raw.device)
                                          .expand(*raw.shape[:-1], fmt.block_size)), fmt.block_size)
    one = fmt.dequantize(bits.with_codes(raw, torch.ones(1, dtype=torch.long, device=raw.device)
                                         .expand(*raw.shape[:-1], fmt.block_size)), fmt.block_size)
    return one - zero, zero
