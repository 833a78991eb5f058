import pytest
import torch

from llmquant.numerics.pack import pack_gptq, pack_int32, unpack_gptq, unpack_int32
from llmquant.nn.qlinear import QuantLinear
from llmquant.numerics.grid import QuantSpec, default_g_idx, fit, quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_round_trip(bits, dim):
    shape = (96, 40) if dim == 0 else (40, 96)
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    words = pack_int32(codes, bits, dim)
    assert words.dtype == torch.int32 and words.shape[dim] == 96 * bits // 32
    assert torch.equal(unpack_int32(words, bits, dim), codes)


def test_bit_positions_follow_the_published_layout():
    codes = torch.randint(0, 16, (64, 3), dtype=torch.uint8)
    w = pack_int32(codes, 4, 0)[0, 0].item() & 0xFFFFFFFF
    assert [(w >> (4 * j)) & 0xF for j in range(8)] == codes[:8, 0].tolist()
    codes3 = torch.randint(0, 8, (32, 1), dtype=torch.uint8)
    words = [v & 0xFFFFFFFF for v in pack_int32(codes3, 3, 0)[:, 0].tolist()]
    stream = words[0] | words[1] << 32 | words[2] << 64
    assert [(stream >> (3 * j)) & 7 for j in range(32)] == codes3[:, 0].tolist()
    # the straddling codes: #10 has 2 bits in word 0 and 1 in word 1; #21 has 1 bit in word 1 and 2 in word 2
    assert (words[0] >> 30) | (words[1] & 1) << 2 == codes3[10, 0]
    assert (words[1] >> 31) | (words[2] & 3) << 1 == codes3[21, 0]


def test_pack_rejects_partial_words():
    with pytest.raises(ValueError):
        pack_int32(torch.zeros(10, 4, dtype=torch.uint8), 4, 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("zero_offset", [1, 0])
def test_gptq_tensors_round_trip_exactly(bits, act_order, sym, zero_offset):
    w = torch.randn(64, 192) * 0.02
    w[:8, :128] = w[:8, :128].abs()  # groups with no negative weight: an asymmetric zero of 0, which only v2 holds
    spec = QuantSpec(bits, 128, sym, min_zero=0 if sym else zero_offset)
    g_idx = default_g_idx(192, 128)
    if act_order:
        g_idx = g_idx[torch.randperm(192)]
    scales, zeros = fit(w, spec)
    qw = quantize(w, scales, zeros, spec, g_idx)
    tensors = pack_gptq(qw, zero_offset)
    assert tensors["qweight"].shape == (192 * bits // 32, 64)
    assert tensors["qzeros"].shape == (2, 64 * bits // 32)
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (2, 64)
    back = unpack_gptq(tensors, bits, 128, sym, zero_offset)
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(qw, field)), field
    assert (qw.zeros == 0).any() == (not sym and zero_offset == 0)
    layer = QuantLinear.from_quantized(qw, zero_offset=zero_offset)
    assert torch.equal(layer.dequantize_weight(), qw.dequantize())
    x = torch.randn(3, 192)
    assert torch.allclose(layer(x), x @ qw.dequantize().T, atol=1e-5)


def test_kernel_switch(monkeypatch):
    from llmquant.nn import qlinear

    qw = quantize(torch.randn(64, 64), *fit(torch.randn(64, 64), QuantSpec(4, 32)), QuantSpec(4, 32))
    layer = QuantLinear.from_quantized(qw)
    x = torch.randn(2, 64)
    calls = []

    class Stub:
        @staticmethod
        def gptq_matmul(x, qweight, qzeros, scales, g_idx, bits, group_size, zero_offset):
            calls.append((qweight is layer.qweight, bits, group_size, zero_offset))
            return x @ qw.dequantize().T

    monkeypatch.setattr(qlinear, "_load_kernels", lambda: Stub)
    monkeypatch.setenv("LLMQUANT_KERNEL", "auto")
    layer(x)
    assert calls == []  # auto: CPU inputs take the torch path
    monkeypatch.setenv("LLMQUANT_KERNEL", "triton")
    assert torch.allclose(layer(x), x @ qw.dequantize().T, atol=1e-5)
    assert calls == [(True, 4, 32, 1)]
    monkeypatch.setenv("LLMQUANT_KERNEL", "torch")
    layer(x)
    assert len(calls) == 1
    monkeypatch.setattr(qlinear, "_load_kernels", lambda: None)
    monkeypatch.setenv("LLMQUANT_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="cannot run here"):
        layer(x)
    monkeypatch.setenv("LLMQUANT_KERNEL", "cuda")
    with pytest.raises(ValueError):
        layer(x)
