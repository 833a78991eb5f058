import pytest
import torch

import llmquant
from llmquant.api import QuantConfig, quantize
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.models import ADAPTERS, adapter_for
from llmquant.models.adapters import OFFSET
from llmquant.models.discover import discover
from llmquant.models.loader import load_float_model
from tiny import FAMILY_EXTRA, MOE, NO_GGUF, make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny_model(root / family, family) for family in FAMILY_EXTRA}


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq+gptq"])
@pytest.mark.parametrize("family", sorted(FAMILY_EXTRA))
def test_every_family_quantizes_and_loads(family, method, family_dirs, calib, tmp_path):
    src = family_dirs[family]
    config = QuantConfig(method=method, bits=4, group_size=32, sym=False, calib=str(calib), n_samples=4, seqlen=48)
    report = quantize(src, config, tmp_path / "q", progress=False)
    model, _, adapter, _ = load_float_model(src)
    assert adapter.family == family and adapter.gguf_arch == ADAPTERS[family].gguf_arch
    blocks = range(len(adapter.blocks(model)))
    assert report.quantized_linears == sum(len(adapter.for_block(i).linears()) for i in blocks)
    loaded = llmquant.load(tmp_path / "q")
    # the packed model computes exactly what the float model does with the dequantized weights
    for name, module in loaded.named_modules():
        if isinstance(module, llmquant.nn.QuantLinear):
            model.get_submodule(name).weight.data = module.dequantize_weight()
        else:  # AWQ changed the norms and linears its scales were folded into
            for key, param in module.named_parameters(recurse=False):
                model.get_submodule(name).get_parameter(key).data = param.data.clone()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(UserError) as err:
        adapter_for("gpt_neox")
    assert "gpt_neox" in str(err.value) and all(f in str(err.value) for f in ADAPTERS)


@pytest.mark.parametrize("method", ["gptq", "imatrix"])
@pytest.mark.parametrize("family", sorted(set(FAMILY_EXTRA) - NO_GGUF))
def test_every_family_writes_a_q4_k_m_gguf(family, method, calib, tmp_path):
    """256-wide rows, so the K-types apply; the gguf package reads back every tensor the file declares, and
    decodes the block weights of the model the runner computed with."""
    import gguf
    import numpy as np

    src = make_tiny_model(tmp_path / family, family, hidden=256, intermediate=512)
    out = tmp_path / "m.gguf"
    config = QuantConfig(method=method, format="gguf", gguf_type="Q4_K_M", calib=str(calib), n_samples=4, seqlen=48)
    report = quantize(src, config, out, progress=False)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == ADAPTERS[family].gguf_arch
    types = {t.name: t.tensor_type for t in reader.tensors}
    if family in MOE:  # every expert in one 3D tensor a block
        shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
        extra = FAMILY_EXTRA[family]
        experts = extra.get("num_experts") or extra.get("n_routed_experts") or extra["num_local_experts"]
        sparse = range(extra.get("first_k_dense_replace", 0), 2)  # DeepSeek's first block is dense
        assert all(shapes[f"blk.{i}.ffn_{p}_exps.weight"][2] == experts for i in sparse for p in ("gate", "up", "down"))
        adapter = load_float_model(src)[2]
        assert report.quantized_linears == sum(len(adapter.for_block(i).linears()) for i in range(2))
    else:
        assert report.quantized_linears == 2 * len(ADAPTERS[family].linears())
        assert {types[f"blk.{i}.ffn_down.weight"] for i in range(2)} <= {gguf.GGMLQuantizationType.Q4_K,
                                                                         gguf.GGMLQuantizationType.Q6_K}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        assert np.isfinite(values).all() and values.size == int(np.prod(t.shape)), t.name


@pytest.mark.parametrize("family", sorted(set(FAMILY_EXTRA) - MOE))
def test_discovery_agrees_with_every_declared_adapter(family, family_dirs):
    """Inspecting block 0 finds each family's groups in solve order, its blocks, its replayable children and
    their tails, and every AWQ pair fed by a norm or by an elementwise product, folding as declared."""
    model, _, declared, _ = load_float_model(family_dirs[family])
    found = discover(model, family, warn=False)
    assert (found.sequential, found.blocks_path, found.tails, set(found.replayable)) == \
        (declared.sequential, declared.blocks_path, declared.tails, set(declared.replayable))
    assert set(found.scaling_pairs) <= set(declared.scaling_pairs)
    # what it cannot see: attention's v -> o, and phi3's up rows inside gate_up_proj (split, not a product)
    missed = {p.previous for p in set(declared.scaling_pairs) - set(found.scaling_pairs)}
    assert missed <= {"self_attn.v_proj", "self_attn.qkv_proj", "mlp.gate_up_proj"}, missed
    assert any(p.fold == OFFSET for p in found.scaling_pairs) == (declared.norm_offset == 1.0)


UNDECLARED = {"starcoder2": {}, "nemotron": {}}  # LayerNorm with biases; Nemotron's norms compute x * (1 + w) + b


@pytest.mark.parametrize("family", sorted(UNDECLARED))
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_an_undeclared_family_quantizes_through_the_discovered_adapter(family, method, calib, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0)
    src = tmp_path / family
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    argv = [src, "--method", method, "--bits", "4", "--group-size", "32", "--calib", calib, "--n-samples", "4",
            "--seqlen", "48", "--out", tmp_path / "q"]
    assert main(["quantize", *map(str, argv)]) == 0
    err = capsys.readouterr().err
    assert f"family '{family}' has no declared adapter" in err and "linears solved as [self_attn.q_proj," in err
    model, _, _, _ = load_float_model(src)
    loaded = llmquant.load(tmp_path / "q")
    assert sum(isinstance(m, llmquant.nn.QuantLinear) for m in loaded.modules()) == 12  # 6 linears a block
    for name, module in loaded.named_modules():
        if isinstance(module, llmquant.nn.QuantLinear):
            model.get_submodule(name).weight.data = module.dequantize_weight()
        else:
            for key, param in module.named_parameters(recurse=False):
                model.get_submodule(name).get_parameter(key).data = param.data.clone()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)
    assert main(["quantize", str(src), "--method", "rtn", "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "GGUF export needs a declared family" in capsys.readouterr().err


def test_a_block_it_cannot_understand_is_one_line_naming_the_module(tmp_path, capsys):
    """Fused expert weights are no linear: an undeclared mixture-of-experts family is refused by name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("olmoe", vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    src = tmp_path / "moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    capsys.readouterr()
    assert main(["quantize", str(src), "--method", "rtn", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot place 'model.layers.0.mlp.gate.weight'" in err, err
    assert "a weight outside any linear" in err
    assert not (tmp_path / "q").exists()


def test_a_registered_renamed_llama_is_inspected_like_llama(tiny_model_dir, tmp_path):
    """A family transformers builds but llmquant never heard of (here: Llama registered under a new name)."""
    import json
    import shutil
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class RenamedConfig(LlamaConfig):
        model_type = "renamed_llama"

    class RenamedForCausalLM(LlamaForCausalLM):
        config_class = RenamedConfig

    AutoConfig.register("renamed_llama", RenamedConfig, exist_ok=True)
    AutoModelForCausalLM.register(RenamedConfig, RenamedForCausalLM, exist_ok=True)
    src = shutil.copytree(tiny_model_dir, tmp_path / "renamed")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "renamed_llama"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize(src, QuantConfig(method="rtn", bits=4, group_size=32), tmp_path / "q", progress=False)
        expected = quantize(tiny_model_dir, QuantConfig(method="rtn", bits=4, group_size=32), tmp_path / "l",
                            progress=False)
    assert any("renamed_llama" in str(w.message) for w in caught)
    assert (tmp_path / "q/model.safetensors").read_bytes() == (tmp_path / "l/model.safetensors").read_bytes()
    assert expected.quantized_linears == 14


@pytest.mark.parametrize("family", sorted(MOE))
def test_unfused_experts_compute_what_transformers_fused_ones_do(family, family_dirs):
    from transformers import AutoModelForCausalLM

    fused = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    model, _, adapter, _ = load_float_model(family_dirs[family])
    shared = {"qwen2_moe": 3, "deepseek_v3": 3}.get(family, 0)
    attention = 5 if family == "deepseek_v3" else 4  # latent attention: q_a, q_b, kv_a, kv_b, o
    assert adapter.n_experts == 4 and len(adapter.linears()) == attention + shared + 3 * 4
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, fused(ids).logits, atol=1e-5)


def test_an_expert_no_token_is_routed_to_is_observed_on_every_token(family_dirs, calib, tmp_path, monkeypatch):
    """Routing never picks expert 3: its linears are solved from every calibration token (observation only),
    have finite scales, and the report says so; the others are solved from the tokens routed to them."""
    import json

    from transformers.models.mixtral import modeling_mixtral

    routed = modeling_mixtral.MixtralTopKRouter.forward

    def never_three(self, hidden_states):
        logits, weights, index = routed(self, hidden_states)
        other = index.flip(-1)  # the token's other choice
        index = torch.where(index == 3, torch.where(other == 0, 1, 0), index)
        return logits, weights, index

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", never_three)

    def report_with(least):
        config = QuantConfig(method="gptq", bits=4, group_size=32, calib=str(calib), n_samples=4, seqlen=48,
                             expert_min_tokens=least)
        quantize(family_dirs["mixtral"], config, tmp_path / f"q{least}", progress=False)
        return json.loads((tmp_path / f"q{least}/quant_report.json").read_text())["linears"]

    for least, fallen in ((0, {3}), (10**6, {0, 1, 2, 3})):  # the threshold is the user's to move
        seen = report_with(least)
        assert {e for e in range(4) if seen[f"model.layers.0.mlp.experts.{e}.w1"]["expert_fallback"]} == fallen
    report = report_with(None)
    tokens = 4 * 48
    for i in range(2):
        for leaf in ("w1", "w3", "w2"):
            entry = report[f"model.layers.{i}.mlp.experts.3.{leaf}"]
            assert (entry["tokens_routed"], entry["tokens_observed"], entry["expert_fallback"]) == (0, tokens, True)
        busy = report[f"model.layers.{i}.mlp.experts.0.w1"]
        assert busy["tokens_routed"] >= 64 and not busy["expert_fallback"]
        assert busy["tokens_routed"] == busy["tokens_observed"]
    loaded = llmquant.load(tmp_path / "qNone")  # scales are checked finite as they are read
    expert = loaded.model.layers[0].mlp.experts[3]
    assert all(isinstance(getattr(expert, leaf), llmquant.nn.QuantLinear) for leaf in ("w1", "w3", "w2"))
    assert torch.isfinite(expert.w1.dequantize_weight()).all()


def test_deepseek_blocks_of_both_kinds(family_dirs):
    """Block 0 has a dense MLP, block 1 experts: each is solved with its own layout; the router bias (a
    buffer) is read from the checkpoint."""
    from llmquant.models.checkpoint import Checkpoint

    _, _, adapter, _ = load_float_model(family_dirs["deepseek_v3"])
    assert adapter.dense_blocks == {0} and "mlp.down_proj" in adapter.for_block(0).linears()
    assert "mlp.experts.3.down_proj" in adapter.for_block(1).linears()
    checkpoint = Checkpoint(family_dirs["deepseek_v3"])
    block = checkpoint.adapter.blocks(checkpoint.model)[1]
    checkpoint.materialize(block, checkpoint.adapter.block_prefix(1))
    stored = checkpoint.read("model.layers.1.mlp.gate.e_score_correction_bias")
    assert stored.abs().sum() > 0 and torch.equal(block.mlp.gate.e_score_correction_bias, stored)
