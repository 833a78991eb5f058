import pytest
import torch

from llmquant.numerics.grid import QuantSpec, default_g_idx, fit, fit_groups, quantize, round_to_grid
from llmquant.quant.rtn import rtn


def weight(out=24, inp=96, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(out, inp, generator=g) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_codes_in_range_and_error_bounded(bits, group_size, sym):
    w = weight()
    spec = QuantSpec(bits, group_size, sym)
    qw = rtn(w, spec)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= spec.maxq
    assert qw.scales.shape == (24, spec.groups(96)) == qw.zeros.shape
    s = qw.scales[:, qw.g_idx.long()]
    # min-max never clips: every weight is within half a step of its grid point
    assert ((qw.dequantize() - w).abs() <= s / 2 + 1e-6).all()
    assert torch.equal(qw.scales, qw.scales.half().float())  # float16-exact, as the layouts store them
    if sym:
        assert (qw.zeros == (spec.maxq + 1) // 2).all()


def test_short_last_group_is_fitted_on_its_own_columns():
    w = weight(8, 96)
    spec = QuantSpec(4, 64, False)
    scales, zeros = fit(w, spec)
    assert scales.shape == (8, 2)
    tail_s, tail_z = fit_groups(w[:, 64:], spec)
    assert torch.equal(scales[:, 1], tail_s) and torch.equal(zeros[:, 1], tail_z)
    assert torch.equal(default_g_idx(96, 64), torch.tensor([0] * 64 + [1] * 32, dtype=torch.int32))


def test_min_zero_is_respected_without_losing_the_range():
    w = weight(16, 64).abs() + 0.01  # all positive: the natural zero point would be 0
    spec = QuantSpec(4, 32, False, min_zero=1)
    qw = rtn(w, spec)
    assert int(qw.zeros.min()) >= 1
    s = qw.scales[:, qw.g_idx.long()]
    assert ((qw.dequantize() - w).abs() <= s / 2 + 1e-6).all()


def test_mse_clip_is_never_worse_than_minmax():
    w = weight(32, 128)
    w[0, 5] = 1.0  # an outlier makes clipping pay
    for bits in (2, 3, 4):
        err = {}
        for clip in ("minmax", "mse"):
            qw = rtn(w, QuantSpec(bits, 32, False, clip))
            err[clip] = ((qw.dequantize() - w).abs() ** 2.4).sum(1)
        assert (err["mse"] <= err["minmax"] + 1e-9).all()
        assert err["mse"].sum() < err["minmax"].sum()


def test_mse_clip_weighs_each_columns_error_by_its_importance():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 80, generator=gen)
    w[:, ::7] *= 5  # loud columns, whose clipping matters most when they are the important ones
    importance = torch.rand(80, generator=gen) ** 4
    spec = QuantSpec(3, 32, sym=False, clip="mse")
    scales, zeros = fit(w, spec, importance)
    for group, cols in enumerate((slice(0, 32), slice(32, 64), slice(64, 80))):  # the last group is short
        s, z = fit_groups(w[:, cols], spec, importance=importance[cols])
        assert torch.equal(scales[:, group], s) and torch.equal(zeros[:, group], z)

    def weighted_error(s, z):
        q = quantize(w, s, z, spec).dequantize()
        return float(((q - w).abs() ** 2.4 * importance).sum())

    assert weighted_error(scales, zeros) < weighted_error(*fit(w, spec))
    assert all(torch.equal(a, b) for a, b in zip(fit(w, spec, torch.ones(80)), fit(w, spec)))


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (3, False), (4, True)])
def test_mse_clip_search_matches_a_flat_grid(bits, sym):
    """The coarse-then-fine search loses almost nothing against trying every shrink 1, 0.99, ..., 0.2."""
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 4, 128, generator=gen) * torch.rand(64, 4, 1, generator=gen)
    w[:, :, 3] *= 6  # outliers, so that shrinking pays
    importance = torch.rand(4, 128, generator=gen) + 0.05
    spec = QuantSpec(bits, 128, sym, "mse", min_zero=0 if sym else 1)

    def error(s, z):
        q = (round_to_grid(w, s[..., None], z[..., None], spec.maxq) - z[..., None]) * s[..., None]
        return ((q - w).abs() ** 2.4 * importance).sum(-1)

    flat = torch.stack([error(*fit_groups(w * p, QuantSpec(bits, 128, sym, min_zero=spec.min_zero)))
                        for p in torch.arange(100, 19, -1) / 100]).amin(0)
    searched = error(*fit_groups(w, spec, importance=importance))
    assert float(searched.sum()) <= 1.001 * float(flat.sum())  # the coarse steps alone: up to 1.006


def test_zero_rows_and_constant_rows():
    w = torch.zeros(4, 64)
    w[1] = 0.3
    qw = rtn(w, QuantSpec(4, 32, False))
    assert torch.isfinite(qw.scales).all()
    assert torch.allclose(qw.dequantize(), w, atol=1e-3)


def test_quantize_with_permuted_g_idx_uses_each_columns_group():
    w = weight(8, 64)
    spec = QuantSpec(4, 32, False)
    g_idx = default_g_idx(64, 32)[torch.randperm(64)]
    scales, zeros = fit(w, spec)
    qw = quantize(w, scales, zeros, spec, g_idx)
    col = 7
    expect = torch.clamp(torch.round(w[:, col] / scales[:, g_idx[col]]) + zeros[:, g_idx[col]], 0, 15)
    assert torch.equal(qw.codes[:, col].float(), expect)


def test_invalid_specs():
    for kw in ({"bits": 5}, {"group_size": 0}, {"clip": "l1"}):
        with pytest.raises(ValueError):
            QuantSpec(**kw)
