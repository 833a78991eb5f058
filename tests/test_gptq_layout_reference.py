"""The gptq (v1) layout checked against an independent reader written from the published description.

The oracle below shares no code with llmquant.numerics.pack: it reads word by word and spells out
the 3-bit "10-1-10-1-10" pattern field by field, as AutoGPTQ's qlinear_cuda_old.py describes it
(10 whole codes, one code split 2 bits / 1 bit across the word boundary, 10 codes, one split
1 bit / 2 bits, 10 codes). Loops over 32-code blocks are fine here: shapes are small, and a loop
is the plainest way to state the layout. If the writer and this reader agree, the files are in
the layout every gptq loader (AutoGPTQ, GPTQModel, transformers, vLLM) reads.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llmquant.numerics.pack import pack_int32
from llmquant.numerics.grid import QuantizedWeight, default_g_idx

U32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------ the oracle

def _codes_of_block(words: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """The codes of one block: the 32/bits codes of one word (2/4/8 bits), or 32 codes in 3 words (3 bits)."""
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        (w,) = words
        return [(w >> (bits * j)) & mask for j in range(32 // bits)]
    assert bits == 3
    w0, w1, w2 = words
    codes = [(w0 >> (3 * j)) & 7 for j in range(10)]                    # codes 0-9: bits 0-29 of word 0
    codes.append(((w0 >> 30) & 0b11) | ((w1 & 0b1) << 2))              # code 10: 2 bits in word 0, 1 in word 1
    codes += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]               # codes 11-20: bits 1-30 of word 1
    codes.append(((w1 >> 31) & 0b1) | ((w2 & 0b11) << 1))               # code 21: 1 bit in word 1, 2 in word 2
    codes += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]               # codes 22-31: bits 2-31 of word 2
    return codes


def oracle_unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows*32/bits, cols] (int64) from int32 words packed along dim 0, LSB first."""
    w = words.to(torch.int64) & U32  # the int32 bit pattern as an unsigned word
    words_per_block = 3 if bits == 3 else 1
    assert w.shape[0] % words_per_block == 0
    rows = []
    for r in range(0, w.shape[0], words_per_block):
        rows += _codes_of_block([w[r + k] for k in range(words_per_block)], bits)
    return torch.stack(rows)


def oracle_read_linear(qweight, qzeros, scales, g_idx, bits: int) -> dict[str, torch.Tensor]:
    """Codes [out, in], zeros [out, groups] (stored + 1, no wrap: the v1 convention), scales
    [out, groups] float32, g_idx [in], and the dequantized weight w = (q - (z_stored + 1)) * s."""
    in_features = g_idx.shape[0]
    codes = oracle_unpack_rows(qweight, bits)[:in_features].T
    zeros = oracle_unpack_rows(qzeros.T, bits)[: scales.shape[1]] + 1  # packed along the output dim
    s = scales.float().T
    g = g_idx.long()
    weight = (codes.double() - zeros[:, g].double()) * s[:, g].double()
    return {"codes": codes, "zeros": zeros, "scales": s, "g_idx": g_idx, "weight": weight}


# ------------------------------------------------------------------------- the writer's packing, by hand

def pack_like_writer(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The four tensors as the gptq writer produces them from a QuantizedWeight."""
    maxq = (1 << qw.bits) - 1
    return {
        "qweight": pack_int32(qw.codes.T, qw.bits, dim=0),
        "qzeros": pack_int32(((qw.zeros - 1) & maxq).T, qw.bits, dim=1),
        "scales": qw.scales.T.half(),
        "g_idx": qw.g_idx.to(torch.int32),
    }


def random_quantized_weight(out_features: int, in_features: int, bits: int, group_size: int, sym: bool,
                            act_order: bool, seed: int) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    codes = torch.randint(0, maxq + 1, (out_features, in_features), generator=gen).to(torch.uint8)
    scales = (torch.rand(out_features, groups, generator=gen) * 0.05 + 1e-3).half().float()
    if sym:
        zeros = torch.full((out_features, groups), (maxq + 1) // 2, dtype=torch.int32)
    else:  # v1 stores zero - 1, so the representable zeros are 1 .. maxq
        zeros = torch.randint(1, maxq + 1, (out_features, groups), generator=gen).to(torch.int32)
    g_idx = default_g_idx(in_features, group_size)
    if act_order:  # desc_act: the columns' groups in permuted order
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    return QuantizedWeight(codes, scales, zeros, g_idx.to(torch.int32), bits, group_size, sym)


# ---------------------------------------------------------------------------------------------- tests

SHAPES = [(256, 32), (96, 64), (576, 128), (160, -1)]  # (in_features, group_size); 96 and 576 end short


@pytest.mark.parametrize("act_order", [False, True], ids=["static", "act_order"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("in_features,group_size", SHAPES, ids=[f"in{i}_g{g}" for i, g in SHAPES])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_oracle_recovers_what_the_writer_packs(bits, in_features, group_size, sym, act_order):
    out_features = 64
    qw = random_quantized_weight(out_features, in_features, bits, group_size, sym, act_order,
                                 seed=bits * 1000 + in_features + sym + 2 * act_order)
    packed = pack_like_writer(qw)
    groups = qw.scales.shape[1]

    assert packed["qweight"].dtype == torch.int32 and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32
    assert tuple(packed["qweight"].shape) == (in_features * bits // 32, out_features)
    assert tuple(packed["qzeros"].shape) == (groups, out_features * bits // 32)
    assert tuple(packed["scales"].shape) == (groups, out_features)
    assert tuple(packed["g_idx"].shape) == (in_features,)

    read = oracle_read_linear(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert torch.equal(read["codes"], qw.codes.long())
    assert torch.equal(read["zeros"], qw.zeros.long())
    assert torch.equal(read["scales"], qw.scales)
    assert torch.equal(read["g_idx"], qw.g_idx)
    assert torch.equal(read["weight"].float(), qw.dequantize(torch.float32))


def test_three_bit_split_codes_sit_where_autogptq_puts_them():
    """Codes 10 and 21 straddle word boundaries: 10 = 0b101 puts bits 0-1 at bits 30-31 of word 0
    and bit 2 at bit 0 of word 1; 21 = 0b110 puts bit 0 at bit 31 of word 1, bits 1-2 at bits 0-1 of word 2."""
    codes = torch.zeros(32, 1, dtype=torch.uint8)
    codes[10], codes[21] = 0b101, 0b110
    words = pack_int32(codes, 3, dim=0)[:, 0].tolist()
    assert words == [1 << 30, 1, 0b11]
    codes[:] = 0
    codes[9], codes[11], codes[31] = 0b111, 0b011, 0b100
    words = pack_int32(codes, 3, dim=0)[:, 0].to(torch.int64) & U32
    assert words.tolist() == [0b111 << 27, 0b011 << 1, 0b100 << 29]
    assert oracle_unpack_rows(pack_int32(codes, 3, dim=0), 3)[:, 0].tolist() == codes[:, 0].tolist()


@pytest.mark.parametrize("bits,word", [(2, 0x55555555), (3, None), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_zero_words(bits, word):
    """Symmetric zero 2^(bits-1) is stored as 2^(bits-1) - 1 in every field (4-bit: 7 in every nibble)."""
    qw = random_quantized_weight(96, 64, bits, 32, sym=True, act_order=False, seed=bits)
    qzeros = pack_like_writer(qw)["qzeros"].to(torch.int64) & U32
    if bits == 3:  # stored 3 = 0b011 repeated through the 96-bit stream of each 3-word block
        stream = sum(3 << (3 * j) for j in range(32))
        word_triplet = [(stream >> (32 * k)) & U32 for k in range(3)]
        assert qzeros.tolist() == [word_triplet * 3] * 2
    else:
        assert torch.all(qzeros == word)


def test_v1_cannot_store_a_zero_point_of_zero():
    """v1 readers add 1 to the stored field without wrapping, so zero 0 (stored 2^bits - 1) reads back
    as 2^bits: why the writer fits asymmetric grids with min_zero=1."""
    qw = random_quantized_weight(64, 64, 4, 32, sym=False, act_order=False, seed=7)
    qw.zeros[0, 0] = 0
    packed = pack_like_writer(qw)
    read = oracle_read_linear(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    assert read["zeros"][0, 0] == 16


# ------------------------------------------------------------------------------ a real written folder

WRITTEN = [(2, 32, False), (3, 32, False), (3, -1, True), (4, 32, True), (4, -1, False), (8, 32, False)]


@pytest.mark.parametrize("bits,group_size,sym", WRITTEN, ids=[f"b{b}_g{g}_{'sym' if s else 'asym'}"
                                                               for b, g, s in WRITTEN])
def test_oracle_reads_a_folder_the_cli_wrote(tiny_model_dir, tmp_path, bits, group_size, sym):
    from llmquant.api import QuantConfig, quantize

    out = tmp_path / "q"
    quantize(tiny_model_dir, QuantConfig(method="rtn", bits=bits, group_size=group_size, sym=sym), out, progress=False)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((out / "quantize_config.json").read_text())
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq"
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (bits, group_size, sym,
                                                                                          False)
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        floats = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}

    linears = sorted(k[: -len(".qweight")] for k in stored if k.endswith(".qweight"))
    assert len(linears) == 14  # 7 linears in each of 2 blocks; embeddings and lm_head stay float
    for name in linears:
        t = {f: stored[f"{name}.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")}
        assert (t["qweight"].dtype, t["qzeros"].dtype, t["scales"].dtype, t["g_idx"].dtype) == (
            torch.int32, torch.int32, torch.float16, torch.int32), name
        assert f"{name}.weight" not in stored
        w = floats[f"{name}.weight"].double()
        out_features, in_features = w.shape
        assert torch.equal(t["g_idx"], default_g_idx(in_features, group_size)), name
        read = oracle_read_linear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
        assert read["codes"].shape == (out_features, in_features)
        assert read["codes"].max() <= (1 << bits) - 1
        assert read["zeros"].min() >= 1 and read["zeros"].max() <= (1 << bits) - 1, name
        if sym:
            assert torch.all(read["zeros"] == 1 << (bits - 1)), name
        # round to nearest on a grid that covers the group: every weight within half a step
        step = read["scales"][:, t["g_idx"].long()].double()
        err = (read["weight"] - w).abs()
        assert torch.all(err <= step * 0.502 + 1e-7), (name, (err / step).max().item())
