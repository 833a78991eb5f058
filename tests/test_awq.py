import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import FAMILY_EXTRA, make_tiny_model, sample_text

import llmquant
from llmquant.api import QuantConfig, quantize
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.numerics.pack import AWQ_ORDER, pack_awq, unpack_awq
from llmquant.models import ADAPTERS
from llmquant.models.loader import load_float_model
from llmquant.nn.qlinear import QuantLinear
from llmquant.quant.awq import (
    AWQSolver,
    BlockJudge,
    can_fold,
    fake_quantize,
    fold_scales,
    search_clip,
    search_scale,
)
from llmquant.quant.gptq import GPTQSolver, gptq
from llmquant.numerics.grid import QuantizedWeight, QuantSpec, default_g_idx
from llmquant.quant.rtn import RTNSolver, rtn
from llmquant.activations import capture_inputs

SPECS = [QuantSpec(bits, group, sym, min_zero=0 if sym else 1)
         for bits, group, sym in [(2, 32, False), (3, 32, False), (4, 32, True), (8, -1, False), (4, -1, True)]]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", sorted(FAMILY_EXTRA))
def test_folding_leaves_the_float_model_unchanged(family, tmp_path):
    # kv_heads=2 of 4 is grouped-query attention: v -> o_proj cannot be folded and is skipped; Gemma's norms
    # scale by (1 + w), phi3's v and up are the last rows of fused linears: each folds its own way
    for kv_heads in (2, 4):
        model, _, adapter, _ = load_float_model(make_tiny_model(tmp_path / str(kv_heads), family, kv_heads=kv_heads))
        ids = torch.randint(0, 300, (2, 16))
        before = logits(model, ids)
        folded, expected = [], 0
        for index, block in enumerate(adapter.blocks(model)):
            pairs = adapter.for_block(index).scaling_pairs  # DeepSeek: dense blocks first
            for previous, names, fold in pairs:
                channels = block.get_submodule(names[0]).weight.shape[1]  # a router, too
                if can_fold(block.get_submodule(previous), channels, fold):
                    fold_scales(block, previous, list(names), torch.rand(channels) * 8 + 0.05, fold)
                    folded.append(previous)
            grouped = [p for p in pairs if p.readers == ("self_attn.o_proj",)]  # v -> o, not under GQA
            assert len(grouped) == (family != "deepseek_v3")  # its values are interleaved with keys
            expected += len(pairs) - len(grouped) * (kv_heads == 2)
        assert len(folded) == expected
        assert torch.allclose(logits(model, ids), before, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family,judge", [("llama", "block")] + [(f, "rtn") for f in sorted(FAMILY_EXTRA)])
def test_searched_scales_fold_without_changing_the_model(family, judge, tmp_path):
    """The solver's own search and fold (clipping off) keep every block's function, in every family, also when
    each candidate was tried in the block itself."""
    model, _, adapter, _ = load_float_model(make_tiny_model(tmp_path / "m", family, kv_heads=4))
    ids = torch.randint(0, 300, (2, 16))
    before = logits(model, ids)
    spec = QuantSpec(3, 32, False, min_zero=1)
    solver = AWQSolver(RTNSolver(spec), spec, adapter.pairs_at, clip=False, judge=judge, judge_tokens=64)
    inputs = capture_inputs(model, adapter, torch.randint(0, 300, (8, 32)), "cpu", torch.float32)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    blocks = adapter.blocks(model)
    for index, block in enumerate(blocks):
        solver.prepare_block(block, adapter.block_prefix(index), inputs.at_block(index), 4)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    previous = {p.previous for i in range(len(blocks)) for p in adapter.for_block(i).scaling_pairs}
    assert previous & {n.split(".", 3)[3].removesuffix(".weight") for n in changed}
    assert torch.allclose(logits(model, ids), before, atol=2e-5, rtol=1e-5)
    entries = solver._search.values()
    assert all(e["awq_scaled"] for e in entries)
    assert all(e["awq_error"] <= e["awq_error_identity"] and e["awq_judge"] == judge for e in entries)


def test_block_judge_scores_the_block_output_of_the_folded_rounded_group(tmp_path):
    model, _, adapter, _ = load_float_model(make_tiny_model(tmp_path / "m", kv_heads=4))
    inputs = capture_inputs(model, adapter, torch.randint(0, 300, (8, 32)), "cpu", torch.float32)
    block, spec = adapter.blocks(model)[0], QuantSpec(3, 32, False, min_zero=1)
    judge = BlockJudge(block, inputs, batch=3, tokens=64)  # two windows of 32: samples 0 and 4
    names = ["mlp.gate_proj", "mlp.up_proj"]
    linears = [block.get_submodule(n) for n in names]
    weight = torch.cat([linear.weight for linear in linears]).detach()
    before = {n: p.clone() for n, p in block.named_parameters()}
    s = torch.rand(weight.shape[1]) * 2 + 0.2
    score = judge.error(linears, spec)(weight, s, None)
    assert all(torch.equal(p, before[n]) for n, p in block.named_parameters())  # restored after the try
    # by hand: fold s into the norm, round the scaled linears, run both windows through float and rounded
    rounded = copy.deepcopy(block)
    fold_scales(rounded, "post_attention_layernorm", names, s)
    with torch.no_grad():
        for n in names:
            linear = rounded.get_submodule(n)
            linear.weight.copy_(fake_quantize(linear.weight, spec))
        hidden = inputs.hidden[[0, 4]].clone()
        out, ref = (m(hidden, **inputs.kwargs) for m in (rounded, block))
    out, ref = (t[0] if isinstance(t, tuple) else t for t in (out, ref))
    assert score == pytest.approx(float((out - ref).pow(2).mean()), rel=1e-4)
    assert score > 0


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("in_features", [64, 72])  # 72 = 2 groups of 32 + a short one of 8
def test_fake_quantize_is_rtn(spec, in_features):
    w = torch.randn(24, in_features)
    assert torch.equal(fake_quantize(w, spec), rtn(w, spec).dequantize())


def outlier_inputs(n, in_features, seed=0):
    """Activations with a few channels 20x larger than the rest, the case AWQ exists for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    x[:, torch.randperm(in_features, generator=g)[:4]] *= 20
    return x


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("duo", [False, True])
def test_scale_search_beats_plain_rounding_on_the_real_outputs(spec, duo):
    x = outlier_inputs(512, 72)
    w = torch.randn(40, 72) * 0.1
    gram = x.T @ x / x.shape[0]
    best = search_scale(w, gram, x.abs().mean(0), spec, duo_scaling=duo)
    s = best["scales"]

    def measured(scales):  # the folded linear computes Q(W diag(s)) (x / s)
        out = (x / scales) @ fake_quantize(w * scales, spec).T
        return float((out - x @ w.T).pow(2).sum(1).mean())

    assert best["error_identity"] == pytest.approx(measured(torch.ones(72)), rel=1e-3)
    assert best["error"] == pytest.approx(measured(s), rel=1e-3)
    assert best["error"] <= best["error_identity"]
    if spec.bits < 8:  # with outliers, scaling must find a real gain
        assert best["alpha"] is not None and best["error"] < 0.9 * best["error_identity"]
    if best["alpha"] is not None:
        assert torch.all(s > 0) and float(s.max() * s.min()) == pytest.approx(1, rel=1e-4)


@pytest.mark.parametrize("spec", SPECS[:4], ids=str)
def test_gptq_judge_picks_the_scales_gptq_rounds_best(spec):
    # judged by GPTQ's own loss, the chosen scales leave GPTQ less output error than the RTN-judged ones,
    # and the error reported is what the folded, GPTQ-rounded linear really leaves
    x = outlier_inputs(512, 72, seed=2)
    w = torch.randn(48, 72) * 0.1
    gram = x.T @ x / x.shape[0]
    gptq_solver = GPTQSolver(spec, act_order=True, static_groups=True, refit=True)
    awq = AWQSolver(gptq_solver, spec, [("norm", ("linear",))], judge="inner", judge_rows=16)
    by_gptq = search_scale(w, gram, x.abs().mean(0), spec, error=awq._inner_error(""))
    by_rtn = search_scale(w, gram, x.abs().mean(0), spec)
    assert by_gptq["error"] <= min(by_gptq["error_identity"], awq._inner_error("")(w, by_rtn["scales"], gram))
    s, rows = by_gptq["scales"], w[::3]  # judge_rows=16 of 48: every third row
    folded = gptq(rows * s, 2 * gram / (s[:, None] * s[None, :]), spec, act_order=True, static_groups=True,
                  refit=True).weight.dequantize() / s
    measured = float((x @ (folded - rows).T).pow(2).sum(1).mean())
    assert by_gptq["error"] == pytest.approx(measured, rel=0.05)  # the loss is on the damped Hessian


def test_scale_scan_stops_once_past_the_minimum():
    seen = []

    def error(weight, s, gram):  # unimodal in alpha with its minimum at alpha = 0.3; identity scores 1
        alpha = (len(seen) - 1) / 20
        seen.append(alpha)
        return 1.0 if alpha < 0 else 0.5 + (alpha - 0.3) ** 2

    x_mean = torch.rand(16) + 0.5
    best = search_scale(torch.randn(8, 16), torch.eye(16), x_mean, SPECS[1], error=error, patience=2)
    assert best["alpha"] == 0.3 and seen[-1] == 0.4  # 0.35 and 0.4 rose: no candidate past them
    seen.clear()
    assert search_scale(torch.randn(8, 16), torch.eye(16), x_mean, SPECS[1], error=error)["alpha"] == 0.3
    assert len(seen) == 21  # without patience: identity and the whole grid


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_clip_search_lowers_each_groups_output_error(spec):
    x = outlier_inputs(256, 72, seed=1)
    w = torch.randn(40, 72) * 0.1
    w[:, 5] *= 6  # a weight outlier: worth clipping
    clamped, shrink = search_clip(w, x.T @ x / x.shape[0], spec)
    groups = default_g_idx(72, spec.group_size)

    def group_errors(weight):
        d = fake_quantize(weight, spec) - w
        return torch.stack([((x[:, groups == g] @ d[:, groups == g].T) ** 2).mean(0)
                            for g in range(int(groups[-1]) + 1)], 1)

    assert torch.all(group_errors(clamped) <= group_errors(w) * (1 + 1e-4) + 1e-9)
    assert shrink.min() < 1 and torch.all((shrink >= 0.55 - 1e-6) & (shrink <= 1))
    if spec.group_size != -1:
        full = (shrink == 1)[:, groups]  # groups left alone keep their weights exactly
        assert torch.equal(clamped[full], w[full])


def test_asymmetric_clip_shrinks_each_end_on_its_own():
    # one positive outlier per row: the best range cuts the top harder than the bottom, which no single
    # factor on both ends can do
    spec = QuantSpec(3, 32, False, min_zero=1)
    x = outlier_inputs(256, 32, seed=2)
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    w[:, 3] = w[:, 3].abs() * 8
    gram = x.T @ x / x.shape[0]
    clamped, kept = search_clip(w, gram, spec)

    def error(weight):
        return (((x @ (fake_quantize(weight, spec) - w).T) ** 2).mean(0))

    one_factor = torch.stack([error(torch.clamp(w, p * w.amin(1, keepdim=True), p * w.amax(1, keepdim=True)))
                              for p in torch.arange(20, 10, -1) / 20]).amin(0)
    assert torch.all(error(clamped) <= one_factor * (1 + 1e-4) + 1e-9)
    assert error(clamped).sum() < 0.95 * one_factor.sum()
    top, bottom = clamped.amax(1) / w.amax(1), clamped.amin(1) / w.amin(1)
    assert (top < 1).float().mean() > 0.5 and ((top - bottom).abs() > 0.02).float().mean() > 0.5
    assert torch.all((kept > 0.5) & (kept <= 1))


def random_qweight(out_features=24, in_features=64, group_size=32, sym=False):
    groups = -(-in_features // group_size)
    return QuantizedWeight(torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8),
                           torch.rand(out_features, groups).half().float(),
                           torch.randint(0, 16, (out_features, groups), dtype=torch.int32),
                           default_g_idx(in_features, group_size), 4, group_size, sym)


def test_awq_layout_round_trip_and_order():
    qw = random_qweight()
    packed = pack_awq(qw)
    assert packed["qweight"].shape == (64, 3) and packed["qzeros"].shape == (2, 3)
    assert packed["scales"].shape == (2, 24) and packed["scales"].dtype == torch.float16
    back = unpack_awq(packed, 32, False)
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(qw, field)), field

    def oracle(values):  # [rows, out] -> words: nibble i of word c holds column 8c + AWQ_ORDER[i]
        rows, cols = values.shape
        words = torch.zeros(rows, cols // 8, dtype=torch.int64)
        for r in range(rows):
            for c in range(cols // 8):
                for i in range(8):
                    words[r, c] |= int(values[r, 8 * c + AWQ_ORDER[i]]) << (4 * i)
        return (words - (words >= 2**31).long() * 2**32).to(torch.int32)

    assert torch.equal(packed["qweight"], oracle(qw.codes.T))
    assert torch.equal(packed["qzeros"], oracle(qw.zeros.T))  # raw zero points: no - 1
    one = QuantizedWeight(torch.arange(1, 9, dtype=torch.uint8)[:, None], torch.ones(8, 1),
                          torch.arange(1, 9, dtype=torch.int32)[:, None], torch.zeros(1, dtype=torch.int32),
                          4, -1, False)
    word = 0x86427531 - 2**32  # columns 1..8 in nibble order 0,2,4,6,1,3,5,7 (low nibble first)
    assert pack_awq(one)["qweight"].tolist() == [[word]] and pack_awq(one)["qzeros"].tolist() == [[word]]
    with pytest.raises(ValueError, match="4-bit"):
        pack_awq(QuantizedWeight(qw.codes % 8, qw.scales, qw.zeros % 8, qw.g_idx, 3, 32, False))
    with pytest.raises(ValueError, match="g_idx"):
        pack_awq(QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.g_idx.flip(0), 4, 32, False))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(sample_text(12000, seed=3))
    return path


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_awq_checkpoint_loads_and_matches_its_gptq_twin(tiny_model_dir, calib_file, tmp_path):
    """The same AWQ result written in both layouts: the awq folder follows the GEMM conventions and
    both load to the same model. Linears whose widths the awq layout cannot hold stay float."""
    common = dict(method="awq", bits=4, group_size=32, sym=False, calib=str(calib_file), n_samples=8, seqlen=64)
    awq = quantize(tiny_model_dir, QuantConfig(format="awq", **common), tmp_path / "awq", progress=False)
    quantize(tiny_model_dir, QuantConfig(format="gptq", **common), tmp_path / "gptq", progress=False)
    q = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert {k: q[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    assert q["modules_to_not_convert"] is None and awq.quantized_linears == 14
    assert json.loads((tmp_path / "awq" / "quant_config.json").read_text())["w_bit"] == 4
    with safe_open(tmp_path / "awq" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.qweight").get_shape() == [64, 8]
        assert "model.layers.0.self_attn.q_proj.g_idx" not in f.keys()
    a, g = llmquant.load(tmp_path / "awq"), llmquant.load(tmp_path / "gptq")
    for name, module in a.named_modules():
        if isinstance(module, QuantLinear):
            twin = g.get_submodule(name).unpack()
            for field in ("codes", "scales", "zeros", "g_idx"):
                assert torch.equal(getattr(module.unpack(), field), getattr(twin, field)), (name, field)
    assert torch.equal(a.model.layers[0].input_layernorm.weight, g.model.layers[0].input_layernorm.weight)
    report = json.loads((tmp_path / "awq" / "quant_report.json").read_text())["linears"]
    assert report["model.layers.0.mlp.gate_proj"]["awq_scaled"] is True
    assert report["model.layers.0.self_attn.o_proj"]["awq_scaled"] is False  # the tiny model uses GQA
    # an awq checkpoint from another tool may store zero points of 0: held exactly (QuantLinear takes the v2
    # convention for awq layers), not wrapped to 16 as the gptq v1 convention would
    path = tmp_path / "awq" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.qzeros"].zero_()
    save_file(tensors, path, metadata={"format": "pt"})
    layer = llmquant.load(tmp_path / "awq").model.layers[0].self_attn.q_proj
    assert layer.zero_offset == 0 and (layer.unpack().zeros == 0).all()
    # 96 inputs are 1.5 groups of 64: without a g_idx the awq layout leaves down_proj in float
    # (2 of 14 linears: more than a run leaves in float unless asked, and nothing is written)
    with pytest.raises(UserError, match="--allow-float"):
        quantize(tiny_model_dir, QuantConfig(method="rtn", format="awq", group_size=64), tmp_path / "short", progress=False)
    assert not (tmp_path / "short").exists()
    short = quantize(tiny_model_dir, QuantConfig(method="rtn", format="awq", group_size=64, allow_float=True), tmp_path / "short",
                     progress=False)
    assert short.skipped == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert short.bits_per_parameter > short.bpw  # the float linears count in the whole file's figure
    config = json.loads((tmp_path / "short" / "config.json").read_text())["quantization_config"]
    assert config["modules_to_not_convert"] == short.skipped
    # GPTQModel ignores modules_to_not_convert and reads quant_config.json first: `dynamic` in both
    autoawq = json.loads((tmp_path / "short" / "quant_config.json").read_text())
    for c in (config, autoawq):
        assert c["dynamic"] == {f"-:^{re.escape(n)}$": {} for n in short.skipped}
    assert isinstance(llmquant.load(tmp_path / "short").model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_awq_clips_before_rtn_and_leaves_the_ranges_to_gptq(tiny_model_dir, calib_file, tmp_path):
    """By default AWQ clips each group for its RTN, and awq+gptq leaves the ranges to GPTQ's own search and
    judges the scales by GPTQ's error; --awq-search picks the judge."""
    common = dict(bits=3, group_size=32, sym=False, calib=str(calib_file), n_samples=8, seqlen=64)
    clipped = {}
    for method, awq_clip, search, judge in (("awq", None, None, "block"), ("awq+gptq", None, None, "inner"),
                                            ("awq+gptq", True, None, "inner"), ("awq", None, "rtn", "rtn")):
        out = tmp_path / f"{method}-{awq_clip}-{search}"
        quantize(tiny_model_dir, QuantConfig(method=method, awq_clip=awq_clip, awq_search=search, **common), out,
                 progress=False)
        report = json.loads((out / "quant_report.json").read_text())["linears"]
        assert all(entry["awq_pair"] for entry in report.values())  # the scales are searched either way
        assert {entry["awq_judge"] for entry in report.values()} == {judge}
        clipped[method, awq_clip, search] = [name for name, entry in report.items() if "awq_clip_mean" in entry]
        meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"]
        assert meta["clip"] == ("mse" if method == "awq+gptq" else "minmax")
    assert clipped["awq+gptq", None, None] == []
    # all but q/k (NO_CLIP), 2 blocks
    assert clipped["awq", None, None] == clipped["awq+gptq", True, None] == clipped["awq", None, "rtn"]
    assert len(clipped["awq", None, None]) == 2 * 5


def test_awq_beats_rtn_at_3_bits(tiny_model_dir, calib_file, tmp_path, capsys):
    """KLD against the float model, through the CLI, at 3 bits. On this tiny model AWQ gave 0.76x RTN's
    KLD (0.62-0.71x on three more random seeds) and AWQ+GPTQ 0.48x. Asserted: below 0.9x."""
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(sample_text(4000, seed=1))
    kld = {}
    for method in ("rtn", "awq", "awq+gptq"):
        code, out, err = cli(capsys, "quantize", tiny_model_dir, "--method", method, "--bits", 3, "--group-size", 32,
                             "--asym", "--calib", calib_file, "--n-samples", 40, "--seqlen", 128, "--out",
                             tmp_path / method, "--eval", "--eval-data", eval_file, "--eval-seqlen", 128,
                             "--eval-windows", 4, "--json")
        assert code == 0, err
        kld[method] = json.loads(out)["eval"]["kld"]
    assert kld["awq"] < 0.9 * kld["rtn"] and kld["awq+gptq"] < 0.9 * kld["rtn"], kld


def test_awq_user_errors(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def one_line_error(*argv):
        code, _, err = cli(capsys, "quantize", tiny_model_dir, "--out", tmp_path / "q", *argv)
        lines = [line for line in err.splitlines() if line.startswith("llmquant: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    assert "4-bit" in one_line_error("--method", "awq", "--bits", 3, "--format", "awq")
    assert "g_idx" in one_line_error("--method", "gptq", "--no-static-groups", "--format", "awq")
    from dataclasses import replace

    monkeypatch.setitem(ADAPTERS, "llama", replace(ADAPTERS["llama"], scaling_pairs=()))
    assert "scaling pairs" in one_line_error("--method", "awq+gptq")
    assert not (tmp_path / "q").exists()
