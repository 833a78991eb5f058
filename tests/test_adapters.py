import pytest
import torch

import llmquant
from llmquant.api import QuantConfig, quantize
from llmquant.errors import UserError
from llmquant.models import ADAPTERS, adapter_for
from llmquant.models.loader import load_float_model
from tiny import FAMILY_EXTRA, make_tiny_model


@pytest.mark.parametrize("family", sorted(FAMILY_EXTRA))
def test_every_family_quantizes_and_loads(family, tmp_path):
    src = make_tiny_model(tmp_path / family, family)
    report = quantize(src, QuantConfig(bits=4, group_size=32, sym=False), tmp_path / "q", progress=False)
    model, _, adapter, _ = load_float_model(src)
    assert adapter is ADAPTERS[family]
    assert report.quantized_linears == len(adapter.blocks(model)) * len(adapter.linears())
    loaded = llmquant.load(tmp_path / "q")
    # the packed model computes exactly what the float model does with the dequantized weights
    for name, module in loaded.named_modules():
        if isinstance(module, llmquant.nn.QuantLinear):
            model.get_submodule(name).weight.data = module.dequantize_weight()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(UserError) as err:
        adapter_for("gpt_neox")
    assert "gpt_neox" in str(err.value) and all(f in str(err.value) for f in ADAPTERS)
