"""Packed linears on PyTorch's CPU weight-only kernels (llmquant/nn/cpu.py) against the float layer
carrying the dequantized weight, computed in float64 from the grid's own definition."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmquant.nn.cpu import Int4CpuLinear, cpu_linear, use_cpu_kernels
from llmquant.nn.qlinear import QuantLinear
from llmquant.numerics.grid import QuantizedWeight, default_g_idx

# outputs come back in bfloat16 (8 significant bits) and inputs go in rounded to it:
# ||y - ref|| / ||ref|| stays near 3e-3
TOLERANCE = 1e-2
MODEL_TOLERANCE = 3e-2  # a whole model: every linear's input rounded to bfloat16, through two blocks


def random_weight(out_f: int, in_f: int, bits: int, group: int, sym: bool, act_order: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else -(-in_f // group)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen).to(torch.uint8)
    scales = (torch.rand(out_f, groups, generator=gen) * 0.02 + 0.001).half().float()
    if sym:
        zeros = torch.full((out_f, groups), (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.randint(1, maxq + 1, (out_f, groups), generator=gen).to(torch.int32)
    g_idx = default_g_idx(in_f, group)
    if act_order:  # GPTQ's act-order: groups assigned along a permutation of the columns
        perm = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = default_g_idx(in_f, group)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group, sym)


CASES = [  # (out, in, bits, group, sym, act_order)
    *[(64, 256, b, g, s, a) for b, g, s, a in itertools.product((2, 3, 4), (32, 128, -1), (True, False), (False, True))],
    *[(64, 256, 8, g, s, a) for g, s, a in itertools.product((32, 128, -1), (True, False), (False, True))],
    (192, 576, 4, 128, True, False),   # the demo's widths: the last group of 128 is 64 wide
    (64, 576, 8, 128, False, False),
    (32, 96, 4, 32, False, True),
]


@pytest.mark.parametrize("out_f,in_f,bits,group,sym,act_order", CASES)
def test_a_packed_linear_on_the_cpu_kernels_computes_the_dequantized_product(out_f, in_f, bits, group, sym,
                                                                            act_order):
    qw = random_weight(out_f, in_f, bits, group, sym, act_order, seed=out_f * 1000 + in_f + bits)
    bias = torch.randn(out_f)
    layer = QuantLinear.from_quantized(qw, bias)
    twin = cpu_linear(layer)
    assert isinstance(twin, Int4CpuLinear)
    reference = qw.dequantize(torch.float64)
    for rows in (1, 5, 33):
        x = torch.randn(2, rows, in_f)
        want = x.double() @ reference.T + bias.double()
        got = twin(x)
        assert got.dtype == x.dtype and got.shape == want.shape
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < TOLERANCE, (rows, err)
        # no less exact than the float layer computing in bfloat16 with the dequantized weight
        dense = x.bfloat16() @ reference.bfloat16().T + bias.bfloat16()
        assert err < 1.5 * ((dense.double() - want).norm() / want.norm()).item(), (rows, err)


def test_the_twin_holds_no_float_weight_and_fewer_bytes_than_the_gptq_layout():
    for bits in (2, 3, 4, 8):
        qw = random_weight(64, 512, bits, 128, False, True, seed=bits)
        layer = QuantLinear.from_quantized(qw)
        twin = cpu_linear(layer)
        held = {n: t for n, t in twin.state_dict().items()}
        assert not any(t.dtype in (torch.float32, torch.float64) and t.numel() >= 64 * 512 for t in held.values())
        code_bytes = sum(t.numel() * t.element_size() for n, t in held.items() if n == "packed")
        assert code_bytes == 64 * 512 * (1 if bits == 8 else 0.5)


def test_shapes_the_kernels_cannot_take_stay_packed_and_are_named():
    model = torch.nn.Sequential()
    model.add_module("odd", QuantLinear.from_quantized(random_weight(24, 64, 4, 32, True, False, 0)))  # 24 rows
    model.add_module("ok", QuantLinear.from_quantized(random_weight(32, 64, 4, 32, True, False, 1)))
    model.add_module("narrow", QuantLinear.from_quantized(random_weight(32, 40, 4, 20, True, False, 2)))
    kept = use_cpu_kernels(model)
    assert kept == ["odd", "narrow"]
    assert isinstance(model.ok, Int4CpuLinear) and isinstance(model.odd, QuantLinear)


def greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """(greedy continuation of `ids`, logits of the prompt's forward)."""
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        logits, past = out.logits, out.past_key_values
        token = logits[:, -1:].argmax(-1)
        tokens = [token.item()]
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(token.item())
    return tokens, logits.float()


@pytest.mark.parametrize("fmt,settings", [
    ("gptq", dict(bits=4, group_size=32, sym=False)),
    ("gptq", dict(bits=8, group_size=32, sym=True)),
    ("gptq", dict(bits=3, group_size=32, sym=False)),
    ("awq", dict(bits=4, group_size=32, sym=False)),
])
def test_a_packed_model_on_the_cpu_kernels_computes_what_the_dequantized_float_model_does(tiny_model_dir, tmp_path,
                                                                                         fmt, settings):
    from llmquant.api import QuantConfig, load_any, quantize

    out = tmp_path / "q"
    quantize(tiny_model_dir, QuantConfig(method="rtn", format=fmt, **settings), out, progress=False)
    packed, _ = load_any(out)
    exact, _ = load_any(out, exact=True)  # float32 everywhere, each layer dequantized to the grid's weights
    assert not any(isinstance(m, QuantLinear) for m in packed.modules())
    assert any(isinstance(m, QuantLinear) for m in exact.modules())
    ids = torch.randint(3, packed.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    _, got = greedy(packed, ids, 1)
    _, want = greedy(exact, ids, 1)
    err = ((got - want).norm() / want.norm()).item()
    assert err < MODEL_TOLERANCE, err
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


# ---------------------------------------------------------------------------------------------
# GGUF files: linears and embedding tables computing with the file's blocks (nn/cpu.block_linear)

GGUF_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_a_gguf_tensor_computes_in_its_blocks_what_its_decoded_weights_do(name):
    """Against gguf-decoded weights (our decoder equals the gguf package's bit for bit: test_gguf_quants)."""
    from llmquant.nn.cpu import GroupDequantLinear, block_linear
    from llmquant.numerics.ggml import CODECS, BlockTensor

    fmt = CODECS[name]
    gen = torch.Generator().manual_seed(len(name))
    data = fmt.quantize(torch.randn(64, 512, generator=gen) * 0.02 + 0.003)  # a mean, so affine bases matter
    bias = torch.randn(64, generator=gen)
    layer = block_linear(BlockTensor(fmt.ggml_type, data, 512), bias)
    assert isinstance(layer, Int4CpuLinear if fmt.sub_block == 32 else GroupDequantLinear)
    held = layer.state_dict().values()
    assert not any(t.is_floating_point() and t.numel() >= 64 * 512 // 4 for t in held)  # no float weight kept
    reference = fmt.dequantize(data, 512).double()
    for rows in (1, 7):
        x = torch.randn(rows, 512, generator=gen)
        want = x.double() @ reference.T + bias.double()
        got = layer(x)
        err = ((got.double() - want).norm() / want.norm()).item()
        dense = x.bfloat16() @ reference.bfloat16().T + bias.bfloat16()
        assert err < 1.5 * ((dense.double() - want).norm() / want.norm()).item(), (rows, err)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0"])
def test_a_gguf_embedding_table_decodes_only_the_rows_it_reads(name):
    from llmquant.nn.cpu import BlockEmbedding
    from llmquant.numerics.ggml import CODECS, BlockTensor

    fmt = CODECS[name]
    data = fmt.quantize(torch.randn(100, 256, generator=torch.Generator().manual_seed(1)))
    table = BlockEmbedding(BlockTensor(fmt.ggml_type, data, 256), torch.bfloat16, embed_scale=16.0)
    ids = torch.tensor([[3, 99, 3], [0, 1, 2]])
    want = (fmt.dequantize(data, 256)[ids].bfloat16() * torch.tensor(16.0, dtype=torch.bfloat16))
    assert torch.equal(table(ids), want)


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """Tiny models with 256-wide rows (K-types apply): untied Llama, tied Qwen2, Gemma 3 (scaled embedding),
    Qwen2-MoE (3D expert tensors)."""
    from tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gguf_cpu")
    return {f: make_tiny_model(root / f"model{i}", f, hidden=256, intermediate=512, heads=4, kv_heads=2,
                               tie=f == "qwen2")
            for i, f in enumerate(["llama", "qwen2", "gemma3_text", "qwen2_moe"])}


@pytest.mark.parametrize("family,mix", [
    *[("llama", mix) for mix in ("Q4_0", "Q4_1", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")],
    ("qwen2", "Q4_K_M"), ("qwen2", "Q8_0"), ("gemma3_text", "Q4_K_M"), ("qwen2_moe", "Q4_K_M"),
])
def test_a_gguf_file_runs_in_its_blocks_as_its_decoded_weights_do(gguf_models, tmp_path, family, mix):
    from llmquant.api import QuantConfig, load_any, quantize
    from llmquant.nn.cpu import BlockEmbedding, GroupDequantLinear

    out = tmp_path / "m.gguf"
    quantize(gguf_models[family], QuantConfig(method="rtn", format="gguf", gguf_type=mix), out, progress=False)
    packed, _ = load_any(out)
    exact, _ = load_any(out, exact=True)  # every tensor decoded to float32
    assert isinstance(packed.get_input_embeddings(), BlockEmbedding)
    linears = [n for n, m in exact.named_modules() if isinstance(m, torch.nn.Linear) and "router" not in n
               and not n.endswith("mlp.gate")]
    kinds = {n: type(m) for n, m in packed.named_modules() if n in linears}
    assert set(kinds.values()) <= {Int4CpuLinear, GroupDequantLinear} and len(kinds) == len(linears), kinds
    biggest = max(exact.get_submodule(n).weight.numel() for n in linears)
    assert not any(t.is_floating_point() and t.numel() >= biggest // 4
                   for t in [*packed.parameters(), *packed.buffers()])  # no float copy of a weight anywhere
    ids = torch.randint(3, packed.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    _, got = greedy(packed, ids, 1)
    _, want = greedy(exact, ids, 1)
    err = ((got - want).norm() / want.norm()).item()
    assert err < MODEL_TOLERANCE, err
    # the same top-1 wherever the exact model's choice is clear: a pick may differ only at a near tie
    picked = want.gather(-1, got.argmax(-1, keepdim=True))[..., 0]
    gap = want.amax(-1) - picked
    assert (gap < 0.02 * want.abs().amax()).all(), gap.max()
