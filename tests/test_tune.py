"""Block-wise tuning after GPTQ: it starts exactly from GPTQ's result and lowers the block's output error."""

import copy

import pytest
import torch

from llmquant.api import QuantConfig
from llmquant.methods import make_solver
from llmquant.models.loader import load_float_model
from llmquant.quant.gptq import GPTQSolver, Hessian, gptq
from llmquant.numerics.grid import QuantSpec
from llmquant.quant.tune import TuneSpec
from llmquant.activations import capture_inputs
from llmquant.runner import run_layers

SPEC = QuantSpec(2, 32, sym=False, min_zero=1)


@pytest.mark.parametrize("act_order", [False, True])
def test_unrounded_codes_round_to_the_codes(act_order):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=gen) * torch.linspace(0.2, 3, 96)
    h = Hessian(96, "cpu")
    h.add(x)
    result = gptq(torch.randn(24, 96, generator=gen), h.H, SPEC, block_size=32, act_order=act_order)
    assert torch.equal(result.unrounded.round().clamp(0, SPEC.maxq).to(torch.uint8), result.weight.codes)


def quantize_first_block(model_dir, tune: TuneSpec):
    model, _, adapter, _ = load_float_model(model_dir)
    samples = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    targets = {adapter.block_prefix(0) + n for n in adapter.linears()}
    float_block = copy.deepcopy(adapter.blocks(model)[0])
    inputs = capture_inputs(model, adapter, samples, "cpu", torch.float32)
    solver = GPTQSolver(SPEC, refit=True, tune=tune)
    quantized = run_layers(model, adapter, solver, targets, samples, progress=False)
    with torch.no_grad():
        outs = [block(inputs.hidden.clone(), **inputs.kwargs) for block in (float_block, adapter.blocks(model)[0])]
    want, got = (o[0] if isinstance(o, tuple) else o for o in outs)
    return quantized, float((got - want).pow(2).mean()), solver.report


def test_tuning_starts_from_gptqs_result(tiny_model_dir):
    # with no step size the offsets and scale factors stay at zero: GPTQ's codes and scales, unchanged
    plain, error, _ = quantize_first_block(tiny_model_dir, TuneSpec(0))
    still, same_error, report = quantize_first_block(tiny_model_dir, TuneSpec(3, samples=2, lr=0.0))
    assert set(still) == set(plain)
    for name, qw in plain.items():
        assert torch.equal(still[name].codes, qw.codes) and torch.equal(still[name].scales, qw.scales), name
    assert same_error == pytest.approx(error, rel=1e-5)
    assert all("tune_loss_first" in entry for entry in report.values())


def test_tuning_lowers_the_block_output_error(tiny_model_dir):
    plain, error, _ = quantize_first_block(tiny_model_dir, TuneSpec(0))
    tuned, tuned_error, _ = quantize_first_block(tiny_model_dir, TuneSpec(40, samples=2, lr=0.01))
    moved = sum(int((tuned[n].codes != qw.codes).sum()) for n, qw in plain.items())
    assert moved > 0
    assert tuned_error < 0.9 * error
    for qw in tuned.values():
        assert int(qw.codes.max()) <= SPEC.maxq
        assert torch.equal(qw.scales, qw.scales.half().float()) and (qw.scales > 0).all()


def test_awq_then_gptq_is_tuned_too(tiny_model_dir):
    model, _, adapter, _ = load_float_model(tiny_model_dir)
    samples = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    targets = {adapter.block_prefix(i) + n for i in range(2) for n in adapter.linears()}
    config = QuantConfig(method="awq+gptq", bits=2, group_size=32, sym=False, tune_iters=4, tune_samples=2)
    solver = make_solver(config, config.spec(), adapter.scaling_pairs, targets)
    run_layers(model, adapter, solver, targets, samples, progress=False)
    assert set(solver.report) == targets
    for name, entry in solver.report.items():
        assert "awq_pair" in entry and "loss" in entry and "tune_loss_last" in entry, name
