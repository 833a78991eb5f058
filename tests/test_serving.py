"""`inspect` names the runtimes that load a checkpoint and their kernels, from what the checkpoint says
(llmquant/serving.py holds the rules read from vLLM's, GPTQModel's and transformers' loaders)."""

import json

import pytest

from llmquant.cli import main
from llmquant.formats.hf import gptq_config, save_quantized
from llmquant.models.loader import load_float_model
from llmquant.numerics.grid import QuantSpec
from llmquant.serving import GPTQMODEL, TRANSFORMERS, VLLM, gptq_runtimes

from test_hf_format import quantize_all


def _inspect(capsys, path) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return {r["name"]: r for r in json.loads(capsys.readouterr().out)["serving"]}


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_inspect_names_the_runtimes_that_load_a_gptq_checkpoint(tiny_model_dir, tmp_path, capsys, sym,
                                                                 checkpoint_format, desc_act):
    model, _, adapter, src = load_float_model(tiny_model_dir)
    spec = QuantSpec(4, 32, sym, min_zero=1 if checkpoint_format == "gptq" and not sym else 0)
    out = save_quantized(tmp_path / "q", model, quantize_all(model, adapter, spec, desc_act), src,
                         gptq_config(4, 32, sym, desc_act=desc_act, static_groups=not desc_act,
                                     checkpoint_format=checkpoint_format))
    found = _inspect(capsys, out)
    vllm, gptqmodel, transformers = found[VLLM], found[GPTQMODEL], found[TRANSFORMERS]
    assert vllm["loads"] == (sym and not desc_act), vllm
    if not sym:
        assert "asymmetric" in vllm["how"]
    elif desc_act:
        assert "desc_act" in vllm["how"]
    else:
        assert vllm["how"].startswith("Marlin")
    # GPTQModel cannot tell whose convention an asymmetric v1 file follows; v2 says it
    assert gptqmodel["loads"] == (sym or checkpoint_format == "gptq_v2"), gptqmodel
    if not gptqmodel["loads"]:
        assert "--checkpoint-format gptq_v2" in gptqmodel["how"]
    else:
        assert ("Marlin" if sym else "ExllamaV2") in gptqmodel["how"]
    assert transformers["loads"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{checkpoint_format} 4-bit" in text and f"{VLLM}: {'yes' if vllm['loads'] else 'no'}" in text


def test_partial_groups_keep_a_checkpoint_off_the_fast_kernels():
    """The demo's 576-wide layers at group 128: 4.5 groups, which Marlin and the int4 CPU kernels refuse."""
    q = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    shapes = [(576, 576), (576, 1536), (1536, 576), (576, 192)]
    vllm, gptqmodel, transformers, _ = gptq_runtimes(q, shapes)
    assert not vllm.loads and "576" in vllm.how and "multiple of 128" in vllm.how
    assert 'backend="torch"' in transformers.how and "576" in transformers.how
    vllm, _, transformers, _ = gptq_runtimes({**q, "group_size": 64}, shapes)
    assert vllm.loads and "Machete" not in vllm.how  # Machete needs outputs in multiples of 128: 192 is not
    assert "int4" in transformers.how


@pytest.mark.parametrize("bits, sym, vllm_loads, cuda", [(3, True, False, "Torch"), (2, False, False, "Triton"),
                                                         (8, True, True, "Marlin"), (8, False, False, "Triton")])
def test_bits_decide_the_kernels(bits, sym, vllm_loads, cuda):
    q = {"quant_method": "gptq", "bits": bits, "group_size": 128, "sym": sym, "desc_act": False,
         "checkpoint_format": "gptq_v2"}
    vllm, gptqmodel, _, _ = gptq_runtimes(q, [(4096, 4096), (4096, 14336)])
    assert vllm.loads == vllm_loads and gptqmodel.loads
    assert gptqmodel.how.startswith(f"CUDA: {cuda}") and "CPU: Torch" in gptqmodel.how
