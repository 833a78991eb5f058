import pytest
import torch

from llmquant.activations import capture_inputs, forward_block
from llmquant.models.loader import load_float_model
from llmquant.numerics.grid import QuantSpec
from llmquant.quant.rtn import rtn
from llmquant.runner import run_layers
from tiny import make_tiny_model


class Gram:
    def __init__(self):
        self.xtx, self.n = 0, 0

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).double()
        self.xtx = self.xtx + x.T @ x
        self.n += x.shape[0]


class RecordingRTN:
    """A calibrated solver: records X^T X of each linear's inputs, quantizes with RTN."""

    calibrated = True

    def __init__(self, spec):
        self.spec, self.seen, self.report = spec, {}, {}

    def observer(self, names, linears):
        gram = Gram()
        self.seen.update({name: gram for name in names})
        return gram

    def quantize(self, name, linear, observer):
        assert observer is self.seen[name] and observer.n > 0
        return rtn(linear.weight, self.spec)


def test_runner_observes_what_the_quantized_model_computes(tiny_model_dir):
    model, _, adapter, _ = load_float_model(tiny_model_dir)
    samples = torch.randint(0, 300, (5, 24))
    targets = {adapter.block_prefix(i) + n for i in range(2) for n in adapter.linears()}
    targets.discard("model.layers.1.mlp.down_proj")  # a linear left in float is simply not touched
    before = model.model.layers[1].mlp.down_proj.weight.clone()
    solver = RecordingRTN(QuantSpec(3, 32, False))
    attention, gate = [], []
    hooks = [block.self_attn.register_forward_pre_hook(lambda m, a, k, i=i: attention.append(i), with_kwargs=True)
             for i, block in enumerate(model.model.layers)]
    hooks += [block.mlp.gate_proj.register_forward_hook(lambda m, a, o, i=i: gate.append(i))
              for i, block in enumerate(model.model.layers)]
    quantized = run_layers(model, adapter, solver, targets, samples, batch_tokens=48, progress=False)
    for h in hooks:
        h.remove()
    # 3 batches of 2, 2, 1 samples. Attention runs in the q/k/v and o_proj passes; once o_proj is quantized,
    # the gate/up pass applies it to the inputs its pass kept, and later passes replay that output. gate_proj
    # computes in the down_proj pass only, whose kept inputs then give the mlp's output; block 1's down_proj
    # stays float and is not observed, so there the mlp runs in full in the last pass
    assert [attention.count(i) for i in range(2)] == [2 * 3, 2 * 3]
    assert [gate.count(i) for i in range(2)] == [3, 3]
    assert all(type(block.self_attn).__name__ != "_Replay" for block in model.model.layers)
    assert all(type(block.mlp).__name__ != "_Replay" for block in model.model.layers)
    assert set(quantized) == targets == set(solver.seen)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)
    # every linear was observed on the inputs the fully quantized model gives it: q/k/v after the
    # quantized block 0, o_proj after the quantized q/k/v, and so on
    reference = {name: Gram() for name in targets}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, g=reference[n]: g.add(a[0]))
             for n in targets]
    with torch.no_grad():
        model(samples, use_cache=False)
    for h in hooks:
        h.remove()
    for name in targets:
        assert solver.seen[name].n == reference[name].n == 5 * 24
        assert torch.allclose(solver.seen[name].xtx, reference[name].xtx, rtol=1e-4, atol=1e-4), name
    for name, qw in quantized.items():
        assert torch.allclose(model.get_submodule(name).weight, qw.dequantize())
        assert qw.codes.device.type == "cpu"


class Uncalibrated:
    calibrated = False
    report = {}

    def observer(self, names, linears):
        raise AssertionError("an uncalibrated solver is never asked to observe")

    def quantize(self, name, linear, observer):
        assert observer is None
        return rtn(linear.weight, QuantSpec(4, -1))


def test_uncalibrated_solver_needs_no_samples(tiny_model_dir):
    model, _, adapter, _ = load_float_model(tiny_model_dir)
    targets = {adapter.block_prefix(0) + "mlp.up_proj"}
    quantized = run_layers(model, adapter, Uncalibrated(), targets, progress=False)
    assert list(quantized) == ["model.layers.0.mlp.up_proj"]
    qw = quantized["model.layers.0.mlp.up_proj"]
    assert qw.scales.shape == (96, 1)
    # an autograd graph behind the results would keep a float32 copy of every weight alive to the end
    assert not any(t.requires_grad for t in (qw.codes, qw.scales, qw.zeros))


class Pairs:
    def __init__(self):
        self.x, self.reference = [], []

    def add(self, x, reference=None):
        self.x.append(x.reshape(-1, x.shape[-1]).clone())
        self.reference.append(reference.reshape(-1, x.shape[-1]).clone())


class RecordingPairs(RecordingRTN):
    """A solver with float targets: records each linear's inputs beside the float model's."""

    float_targets = True

    def observer(self, names, linears):
        pairs = Pairs()
        self.seen.update({name: pairs for name in names})
        return pairs

    def quantize(self, name, linear, observer):
        return rtn(linear.weight, self.spec)


def linear_inputs(model, names, samples):
    inputs = {name: [] for name in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs[n].append(a[0]))
             for n in names]
    with torch.no_grad():
        model(samples, use_cache=False)
    for h in hooks:
        h.remove()
    return {name: torch.cat(x).reshape(-1, x[0].shape[-1]) for name, x in inputs.items()}


def test_float_targets_pair_each_input_with_the_float_models(tiny_model_dir):
    model, _, adapter, _ = load_float_model(tiny_model_dir)
    samples = torch.randint(0, 300, (5, 24))
    targets = {adapter.block_prefix(i) + n for i in range(2) for n in adapter.linears()}
    float_inputs = linear_inputs(model, targets, samples)  # before anything is rounded
    solver = RecordingPairs(QuantSpec(2, 32, False))
    run_layers(model, adapter, solver, targets, samples, batch_tokens=48, progress=False)
    quantized_inputs = linear_inputs(model, targets, samples)
    drifted = 0
    for name in targets:
        pairs = solver.seen[name]
        torch.testing.assert_close(torch.cat(pairs.reference), float_inputs[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.cat(pairs.x), quantized_inputs[name], rtol=1e-4, atol=1e-4)
        drifted += not torch.allclose(float_inputs[name], quantized_inputs[name], atol=1e-3)
    assert drifted == len(targets) - 3  # all but block 0's q/k/v, which read the embeddings


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2"])
def test_each_block_runs_with_its_own_attention_mask(family, tmp_path):
    """Sliding-window and full-attention blocks get different masks and rotary tables: the captured inputs,
    propagated block by block, are the model's own hidden states."""
    kinds = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    model, _, adapter, _ = load_float_model(make_tiny_model(tmp_path / family, family, layers=3, **kinds))
    samples = torch.randint(3, 300, (3, 24))  # three times the tiny models' window of 8
    inputs = capture_inputs(model, adapter, samples, "cpu", torch.float32)
    with torch.no_grad():
        states = [model(samples[i:i + 1], output_hidden_states=True).hidden_states for i in range(3)]
    for index, block in enumerate(adapter.blocks(model)):
        forward_block(block, inputs.at_block(index), 2, update=True)
        expected = torch.cat([s[index + 1] for s in states])
        if index == len(adapter.blocks(model)) - 1:
            break  # the last hidden state is reported after the final norm
        assert torch.allclose(inputs.hidden, expected, atol=1e-5), index
    masks = [kwargs["attention_mask"] for kwargs in inputs.block_kwargs]
    assert masks[0] is not masks[1] and masks[0] is masks[2]
