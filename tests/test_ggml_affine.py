"""Block formats as affine code grids (learned from the decoders) and GPTQ on those grids."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from llmquant.numerics.ggml import CODECS
from llmquant.quant.ggml_affine import affine, level_bits
from llmquant.quant.ggml_solver import gptq_blocks

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_learned_code_bits_describe_the_format(name):
    fmt, bits = CODECS[name], level_bits(name)
    assert bits.cmax == 2 ** BITS[name] - 1 and len(bits.byte) == fmt.block_size * BITS[name]
    gen = torch.Generator().manual_seed(1)
    raw = fmt.quantize(torch.randn(12, 2 * fmt.block_size, generator=gen)).reshape(12, 2, fmt.type_size)
    codes = bits.codes(raw)
    assert torch.equal(bits.with_codes(raw, codes), raw)  # reading then writing codes changes nothing
    a, b = affine(fmt, raw, bits)
    new = torch.randint(0, bits.cmax + 1, codes.shape, generator=gen)
    rewritten = bits.with_codes(raw, new)
    assert torch.equal(bits.codes(rewritten), new)
    # decoding by gguf's own dequantizer: exactly a * code + b, for the original codes and for new ones
    for r, c in [(raw, codes), (rewritten, new)]:
        values = gguf.quants.dequantize(r.reshape(12, -1).numpy(), fmt.ggml_type)
        assert np.array_equal(values, (a * c + b).reshape(12, -1).numpy())


def _layer(cols: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) * 0.2 + torch.eye(cols)
    x = torch.randn(2048, cols, generator=gen) @ mix * torch.rand(cols, generator=gen) * 3
    return torch.randn(96, cols, generator=gen) * 0.05, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q2_K", "Q4_K", "Q6_K"])
def test_gptq_on_block_grids_beats_importance_weighted_rounding(name):
    """Output error tr(D H D^T): GPTQ's feedback must clearly beat the imatrix fit of the same format."""
    fmt = CODECS[name]
    weight, H = _layer(512)
    raw, _, damp = gptq_blocks(weight, H, fmt)
    assert raw.shape == (96, 512 // fmt.block_size * fmt.type_size) and damp == 0.01

    def output_error(q):
        d = q - weight
        return float(torch.einsum("ij,jk,ik->", d, H, d))

    ours = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), fmt.ggml_type))
    imatrix = fmt.dequantize(fmt.quantize(weight, torch.diag(H)), 512)
    assert output_error(ours) < 0.8 * output_error(imatrix)
