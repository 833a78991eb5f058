import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llmquant
from llmquant.errors import UserError
from llmquant.formats import atomic, hf, shards
from llmquant.formats.hf import gptq_config, save_quantized
from llmquant.models.loader import load_float_model
from llmquant.nn.qlinear import QuantLinear
from llmquant.numerics.grid import QuantSpec, default_g_idx, fit, quantize


def quantize_all(model, adapter, spec, act_order):
    out = {}
    for i, block in enumerate(adapter.blocks(model)):
        for name in adapter.linears():
            w = block.get_submodule(name).weight.detach()
            g_idx = default_g_idx(w.shape[1], spec.group_size)
            if act_order:
                g_idx = g_idx[torch.randperm(w.shape[1])]
            scales, zeros = fit(w, spec)
            out[adapter.block_prefix(i) + name] = quantize(w, scales, zeros, spec, g_idx)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_written_checkpoint_reads_back_exactly(tiny_model_dir, tmp_path, bits, act_order):
    model, _, adapter, src = load_float_model(tiny_model_dir)
    spec = QuantSpec(bits, 32, sym=bits % 2 == 0, min_zero=1)
    quantized = quantize_all(model, adapter, spec, act_order)
    out = save_quantized(tmp_path / "q", model, quantized, src,
                    gptq_config(bits, 32, spec.sym, desc_act=act_order), max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())  # small shards force an index
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == bits
    assert (out / "quantize_config.json").exists() and (out / "tokenizer.json").exists()
    loaded = llmquant.load(out)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(quantized)
    for name, qw in quantized.items():
        back = layers[name].unpack()
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(back, field), getattr(qw, field)), (name, field)
    # the non-quantized tensors are bit-identical too
    float_sd = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name in float_sd and name.rsplit(".", 1)[0] not in quantized:
            assert torch.equal(tensor, float_sd[name]), name


def test_inspect_reads_linears_whose_fields_span_shards(tiny_model_dir, tmp_path):
    model, _, adapter, src = load_float_model(tiny_model_dir)
    quantized = quantize_all(model, adapter, QuantSpec(3, 32, sym=False, min_zero=1), act_order=False)
    config = gptq_config(3, 32, False)
    sharded = save_quantized(tmp_path / "sharded", model, quantized, src, config, max_shard_size="20KB")
    whole = save_quantized(tmp_path / "whole", model, quantized, src, config)
    shard_of = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(len({shard_of[f"{n}.{f}"] for f in hf.PACKED["gptq"]}) > 1 for n in quantized)
    a, b = hf.describe(sharded), hf.describe(whole)
    assert a["files"] > 1 and b["files"] == 1
    for key in ("quantized_linears", "quantized_weights", "bpw"):
        assert a[key] == b[key], key
    assert a["quantized_linears"] == len(quantized)


def test_loaded_model_computes_with_the_dequantized_weights(tiny_model_dir, tmp_path):
    model, _, adapter, src = load_float_model(tiny_model_dir)
    spec = QuantSpec(4, 32, False, min_zero=1)
    quantized = quantize_all(model, adapter, spec, act_order=False)
    save_quantized(tmp_path / "q", model, quantized, src, gptq_config(4, 32, False))
    for name, qw in quantized.items():
        model.get_submodule(name).weight.data = qw.dequantize()
    loaded = llmquant.load(tmp_path / "q")
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_v2_holds_zero_points_of_zero(tiny_model_dir, tmp_path, bits):
    """v2 stores each zero point as is, so an asymmetric zero of 0 (a group with no negative weight) is written
    and read back exactly, where v1 (zero - 1) would wrap it to 2^bits."""
    model, _, adapter, src = load_float_model(tiny_model_dir)
    for block in adapter.blocks(model):  # every block's first linear gets groups of non-negative weights
        weight = block.get_submodule(adapter.linears()[0]).weight.data
        weight[:, :32] = weight[:, :32].abs()
    quantized = quantize_all(model, adapter, QuantSpec(bits, 32, sym=False, min_zero=0), act_order=True)
    assert any((qw.zeros == 0).any() for qw in quantized.values())
    out = save_quantized(tmp_path / "q", model, quantized, src,
                         gptq_config(bits, 32, False, desc_act=True, checkpoint_format="gptq_v2"))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert hf.describe(out)["checkpoint_format"] == "gptq_v2"
    loaded = llmquant.load(out)
    for name, qw in quantized.items():
        back = loaded.get_submodule(name).unpack()
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(back, field), getattr(qw, field)), (name, field)
        model.get_submodule(name).weight.data = qw.dequantize()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


def test_unknown_checkpoint_format_is_one_line(tiny_model_dir, tmp_path):
    model, _, adapter, src = load_float_model(tiny_model_dir)
    out = save_quantized(tmp_path / "q", model, quantize_all(model, adapter, QuantSpec(4, 32), False), src,
                         gptq_config(4, 32, True))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v3"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="checkpoint_format 'gptq_v3' is not supported"):
        llmquant.load(out)


def test_tied_embeddings_are_stored_once(tmp_path):
    from tiny import make_tiny_model

    src = make_tiny_model(tmp_path / "tied", tie=True)
    model, _, adapter, _ = load_float_model(src)
    save_quantized(tmp_path / "q", model, quantize_all(model, adapter, QuantSpec(4, 32), False), src,
              gptq_config(4, 32, True))
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = llmquant.load(tmp_path / "q")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_failed_write_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    model, _, adapter, src = load_float_model(tiny_model_dir)
    quantized = quantize_all(model, adapter, QuantSpec(4, 32), False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.os, "pwrite", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        save_quantized(tmp_path / "q", model, quantized, src, gptq_config(4, 32, True))
    assert list(tmp_path.iterdir()) == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.os, "pwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tmp_path / "q", model, quantized, src, gptq_config(4, 32, True))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_forced(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep").write_text("x")
    with pytest.raises(UserError, match="--force"):
        with atomic.atomic_directory(dest):
            pass
    with atomic.atomic_directory(dest, force=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in dest.iterdir()] == ["new"]


def corrupt(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_reader_rejects_bad_checkpoints(tiny_model_dir, tmp_path):
    model, _, adapter, src = load_float_model(tiny_model_dir)
    save_quantized(tmp_path / "q", model, quantize_all(model, adapter, QuantSpec(4, 32), False), src,
              gptq_config(4, 32, True))
    q = tmp_path / "q"
    with pytest.raises(UserError, match="not a quantized checkpoint"):
        llmquant.load(tiny_model_dir)
    corrupt(q, lambda c: c["quantization_config"].update(group_size=64))  # shapes no longer match
    with pytest.raises(UserError, match="expected"):
        llmquant.load(q)
    with pytest.raises(UserError, match="group 64"):  # inspect refuses what load refuses
        hf.describe(q)
    corrupt(q, lambda c: c["quantization_config"].update(bits=5, group_size=32))
    with pytest.raises(UserError, match="bits=5"):
        llmquant.load(q)
    corrupt(q, lambda c: c["quantization_config"].update(bits=4))
    tensors = load_file(q / "model.safetensors")
    g_idx = next(n for n in tensors if n.endswith(".g_idx"))
    tensors[g_idx] = tensors[g_idx].clone()
    tensors[g_idx][5] = tensors[g_idx.removesuffix("g_idx") + "scales"].shape[0]  # one past the last group
    save_file(tensors, q / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="names group"):
        llmquant.load(q)
    (q / "model.safetensors").write_bytes(b"\xff" * 64)  # header length far beyond the file
    with pytest.raises(UserError, match="not a valid safetensors file"):
        llmquant.load(q)


def test_float_linears_are_declared_for_gptqmodel_and_transformers():
    skipped = [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj")]
    linears = ["self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    config = gptq_config(3, 32, True, skipped=skipped, block_linears=linears, blocks=2)
    assert len(config["dynamic"]) == 4 and all(k.startswith("-:^model") for k in config["dynamic"])
    assert config["modules_in_block_to_quantize"] == [["self_attn.q_proj", "mlp.down_proj"]]
    uneven = gptq_config(3, 32, True, skipped=skipped[:1], block_linears=linears, blocks=2)
    assert "modules_in_block_to_quantize" not in uneven
