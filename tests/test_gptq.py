"""The GPTQ solver on synthetic layers, where every figure it reports can be recomputed directly."""

import math

import pytest
import torch
from torch import nn

from llmquant.quant.gptq import GPTQSolver, Hessian, gptq, prepare
from llmquant.numerics.grid import QuantSpec, fit
from llmquant.quant.rtn import rtn


def correlated_inputs(n: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Tokens whose columns are strongly correlated, with a few loud channels (as in real LLM layers)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=gen) / math.sqrt(columns) + torch.eye(columns)
    loud = torch.ones(columns)
    loud[:: max(1, columns // 8)] = 6.0
    return (torch.randn(n, columns, generator=gen, dtype=torch.float64) @ mix.double()) * loud.double()


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (weight.double() - approx.double()).T) ** 2).sum())


def test_hessian_is_a_running_average_over_any_batch_shapes():
    x = correlated_inputs(301, 24)
    x_float = x + 0.1 * correlated_inputs(301, 24, seed=1)
    h = Hessian(24, "cpu", torch.float64, cross=True)
    start = 0
    for shape in [(2, 7), (1, 1), (0, 5), (3, 30), (196,)]:  # [batch, seq] or flat token counts, one empty
        m = math.prod(shape)
        h.add(x[start:start + m].reshape(*shape, 24), x_float[start:start + m].reshape(*shape, 24))
        start += m
    assert start == 301 and h.n == 301
    torch.testing.assert_close(h.H, 2 / 301 * x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.C, 2 / 301 * (x_float - x).T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(3, 32, sym=False), QuantSpec(4, -1, sym=True), QuantSpec(2, 16)])
def test_reported_loss_is_the_output_error_on_the_damped_hessian(spec, act_order):
    # GPTQ eliminates one column at a time exactly (OBS), so its accumulated loss must equal
    # (1/2) tr(D H_damped D^T) with D = W - Q, whatever the grid, grouping or column order
    x = correlated_inputs(2048, 96)
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(2))
    h = Hessian(96, "cpu", torch.float64)
    h.add(x)
    result = gptq(weight, h.H, spec, block_size=32, act_order=act_order)
    D = weight.double() - result.weight.dequantize(torch.float64)
    damped = h.H + 0.01 * torch.diag(h.H).mean() * torch.eye(96, dtype=torch.float64)
    assert result.loss == pytest.approx(0.5 * float(torch.trace(D @ damped @ D.T)), rel=1e-6)
    assert output_error(weight, result.weight.dequantize(), x) < 0.95 * output_error(weight, rtn(weight, spec)
                                                                                    .dequantize(), x)


@pytest.mark.parametrize("spec", [QuantSpec(3, 32, sym=False, min_zero=1), QuantSpec(2, 16, sym=True)])
def test_refit_scales_lowers_the_output_error_for_the_same_codes(spec):
    x = correlated_inputs(2048, 96)
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(4))
    h = Hessian(96, "cpu", torch.float64)
    h.add(x)
    plain = gptq(weight, h.H, spec, act_order=True, static_groups=True)
    refit = gptq(weight, h.H, spec, act_order=True, static_groups=True, refit=True)
    assert torch.equal(refit.weight.codes, plain.weight.codes) and torch.equal(refit.weight.zeros, plain.weight.zeros)
    assert torch.equal(refit.weight.scales, refit.weight.scales.half().float())  # what the layout stores
    D = weight.double() - refit.weight.dequantize(torch.float64)
    damped = h.H + 0.01 * torch.diag(h.H).mean() * torch.eye(96, dtype=torch.float64)
    assert refit.loss == pytest.approx(0.5 * float(torch.trace(D @ damped @ D.T)), rel=1e-6)
    assert refit.loss < 0.95 * plain.loss
    assert output_error(weight, refit.weight.dequantize(), x) < output_error(weight, plain.weight.dequantize(), x)


def test_act_order_groups_and_static_groups():
    x = correlated_inputs(1024, 64)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    h = Hessian(64, "cpu")
    h.add(x)
    spec = QuantSpec(4, 16, sym=False)
    order = torch.argsort(torch.diag(h.H), descending=True)
    permuted = gptq(weight, h.H, spec, act_order=True).weight
    # groups are consecutive in solve order: the i-th solved column is in group i // 16
    assert torch.equal(permuted.g_idx[order].long(), torch.arange(64) // 16)
    static = gptq(weight, h.H, spec, act_order=True, static_groups=True).weight
    assert torch.equal(static.g_idx.long(), torch.arange(64) // 16)
    scales, zeros = fit(weight, spec)  # fitted on the original columns, before any column moved
    assert torch.equal(static.scales, scales) and torch.equal(static.zeros, zeros.to(torch.int32))
    assert not torch.equal(permuted.scales, scales)


def test_dead_inputs_and_damping_retry():
    x = correlated_inputs(512, 32)
    x[:, 5] = 0  # an input channel that never fires
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    h = Hessian(32, "cpu", torch.float64)
    h.add(x)
    result = gptq(weight, h.H, QuantSpec(4, 32))
    assert result.damp == 0.01 and torch.isfinite(result.weight.dequantize()).all()
    # one negative eigenvalue of 5% of the mean diagonal: 1% damping fails, 10% factors
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    eig = torch.ones(32, dtype=torch.float64)
    eig[0] = -0.05
    indefinite = q @ torch.diag(eig) @ q.T
    assert gptq(weight, indefinite, QuantSpec(4, 32)).damp == pytest.approx(0.1)


def test_solver_falls_back_to_rtn_and_says_which_linear():
    linear = nn.Linear(32, 8, bias=False)
    solver = GPTQSolver(QuantSpec(4, 32))
    unseen = solver.observer(["a"], [linear])
    with pytest.warns(UserWarning, match="layers.0.mlp.up_proj: saw no calibration tokens"):
        qw = solver.quantize("layers.0.mlp.up_proj", linear, unseen)
    assert torch.equal(qw.codes, rtn(linear.weight, QuantSpec(4, 32)).codes)
    broken = solver.observer(["b"], [linear])
    broken.add(torch.randn(64, 32))
    broken.H.copy_(-torch.eye(32))  # indefinite at any damping
    with pytest.warns(UserWarning, match="layers.1.self_attn.q_proj: H stays indefinite"):
        solver.quantize("layers.1.self_attn.q_proj", linear, broken)
    assert set(solver.report) == {"layers.0.mlp.up_proj", "layers.1.self_attn.q_proj"}
    assert all(entry["fallback"].startswith("rtn: ") for entry in solver.report.values())


def test_float_target_compensates_the_drift_of_the_inputs():
    # the quantized model's inputs x have drifted from the float model's x_float; fitting the float
    # outputs W x_float (not W x) is a least-squares problem whose solution GPTQ should then round
    x = correlated_inputs(4096, 64)
    gen = torch.Generator().manual_seed(6)
    x_float = x + 0.2 * x @ torch.randn(64, 64, generator=gen, dtype=torch.float64) / 8 \
        + 0.1 * torch.randn(4096, 64, generator=gen, dtype=torch.float64)  # not all of the drift is linear in x
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    h = Hessian(64, "cpu", torch.float64, cross=True)
    for chunk in range(0, 4096, 1000):
        h.add(x[chunk:chunk + 1000], x_float[chunk:chunk + 1000])
    target, _, _ = prepare(weight, h.H, h.C, damp=1e-9, max_damp=1.0)  # W moved to its float target
    least_squares = torch.linalg.lstsq(x, x_float @ weight.T).solution.T
    torch.testing.assert_close(target, least_squares, rtol=1e-5, atol=1e-5)

    def distance(qw):  # what the quantized layer should approach: the float layer on the float inputs
        return float(((x @ qw.dequantize(torch.float64).T - x_float @ weight.T) ** 2).sum())

    spec = QuantSpec(8, 32, sym=False)
    plain = gptq(weight.float(), h.H, spec).weight
    targeted = gptq(weight.float(), h.H, spec, C=h.C).weight
    floor = float(((x @ least_squares.T - x_float @ weight.T) ** 2).sum())
    assert floor > 0 and distance(targeted) - floor < 0.05 * (distance(plain) - floor)
    # without drift the target is the weight itself: the option changes nothing
    same = Hessian(64, "cpu", torch.float64, cross=True)
    same.add(x, x)
    assert torch.equal(gptq(weight.float(), same.H, spec, C=same.C).weight.codes, gptq(weight.float(), same.H,
                                                                                          spec).weight.codes)
