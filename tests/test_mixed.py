"""Mixed precision: the allocation, the sensitivity pass behind it, and per-linear settings on disk."""

import itertools
import json
import random

import pytest
import torch

import llmquant
from llmquant.allocation import Choice, Unit, allocate
from llmquant.config import QuantConfig
from llmquant.errors import UserError
from llmquant.formats import hf
from llmquant.formats.hf import gptq_config, module_settings, save_quantized
from llmquant.models.checkpoint import Checkpoint
from llmquant.models.loader import load_float_model
from llmquant.nn.qlinear import QuantLinear
from llmquant.numerics.grid import QuantSpec, fit, quantize
from llmquant.numerics.kld import cost
from llmquant.sensitivity import measure
from llmquant.serving import runtimes
from tiny import make_tiny_model


# ------------------------------------------------------------------------------------------- allocation

def _units(seed: int, n: int = 5) -> list[Unit]:
    """Units with costs falling by a random factor per step of bytes (as rounding error does with bits)."""
    rng = random.Random(seed)
    units = []
    for i in range(n):
        size, loss, choices = 8 * rng.randint(8, 25), rng.uniform(0.5, 5), []
        for bits in (2, 3, 4, 8):
            choices.append(Choice(bits, size * bits // 8, loss * 4.0 ** -bits * rng.uniform(0.5, 2)))
        units.append(Unit((f"u{i}",), choices, size))
    return units


def _best(units: list[Unit], budget: int) -> float:
    """The optimum by brute force."""
    return min(sum(c.cost for c in pick) for pick in itertools.product(*(u.choices for u in units))
               if sum(c.bytes for c in pick) <= budget)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_fits_the_budget_and_comes_close_to_the_optimum(seed):
    units = _units(seed)
    low, high = sum(min(c.bytes for c in u.choices) for u in units), sum(max(c.bytes for c in u.choices) for u in units)
    for budget in (low, (2 * low + high) // 3, (low + 2 * high) // 3, high):
        allocation = allocate(units, budget)
        assert allocation.bytes <= budget
        assert allocation.predicted == pytest.approx(sum(c.cost for c in allocation.chosen.values()))
        best = _best(units, budget)
        assert allocation.predicted <= best * 1.25 + 1e-12, (budget, allocation.predicted, best)
        # no single change that fits makes it better (what the fill step guarantees)
        left = budget - allocation.bytes
        for u in units:
            now = allocation.chosen[u.names]
            assert not any(c.cost < now.cost and c.bytes - now.bytes <= left for c in u.choices)


def test_a_budget_outside_the_choices_is_one_line_with_the_range():
    units = _units(0)
    weights = sum(u.weights for u in units)
    with pytest.raises(UserError, match=r"outside what the choices can meet: 2\.000 to 8\.000"):
        allocate(units, weights // 8, scale=8 / weights)


# ------------------------------------------------------------------------------------------- sensitivity

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # tied and bfloat16, as the demo: the pass before the run computes in float32 on the same skeleton
    return make_tiny_model(tmp_path_factory.mktemp("mixed") / "llama", layers=3, tie=True, dtype=torch.bfloat16)


def _kld(model, ids, name, dW) -> float:
    """The true mean KL divergence (nats per token) of the model's next-token distribution when linear
    `name` changes by dW."""
    linear = model.get_submodule(name)
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits.float(), -1)
        linear.weight += dW
        moved = torch.log_softmax(model(ids).logits.float(), -1)
        linear.weight -= dW
    return float((base.exp() * (base - moved)).sum(-1).mean())


def test_predicted_cost_matches_the_true_kl_divergence(tiny):
    """1/2 sum_o F_o dW_o H dW_o^T from the pass, against the KL divergence the change really causes."""
    checkpoint = Checkpoint(tiny)
    model = load_float_model(tiny)[0].float().eval()
    samples = torch.randint(0, 300, (16, 64), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj",
             "model.layers.2.mlp.up_proj"]
    stats = measure(checkpoint, samples, set(names), lambda n, W, H, F: (W, H, F), progress=False)
    assert set(stats) == set(names)
    generator = torch.Generator().manual_seed(1)
    for name in names:
        W, H, F = stats[name]
        assert torch.equal(W, model.get_submodule(name).weight.float())
        assert (F >= 0).all() and F.sum() > 0 and torch.allclose(H, H.T)
        dW = torch.randn(W.shape, generator=generator) * 0.01
        predicted, true = cost(dW, H, F), _kld(model, samples, name, dW)
        assert 0.5 < predicted / true < 2, (name, predicted, true)


# ------------------------------------------------------------------------------------------- on disk

def test_dynamic_reads_as_gptqmodel_and_vllm_read_it():
    fused = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
    q = gptq_config(4, 128, True, skipped=["model.layers.1.mlp.down_proj"],
                    mixed={fused: (8, 32), ("model.layers.1.mlp.up_proj",): (3, 64)})
    q = {**q, "dynamic": {"-:.*\\.never$": {}, **q["dynamic"]}}
    assert module_settings(q, "model.layers.0.self_attn.k_proj") == {"bits": 8, "group_size": 32, "sym": True}
    assert module_settings(q, "model.layers.0.self_attn.qkv_proj")["bits"] == 8  # vLLM's fused module
    assert module_settings(q, "model.layers.0.self_attn.o_proj")["bits"] == 4
    assert module_settings(q, "model.layers.10.self_attn.q_proj")["bits"] == 4  # anchored: layer 10 is not 0
    assert module_settings(q, "model.layers.1.mlp.up_proj") == {"bits": 3, "group_size": 64, "sym": True}
    assert module_settings(q, "model.layers.1.mlp.down_proj") is None  # "-:" leaves it in float


def _mixed(model, adapter):
    """Every linear on its own grid: bits and groups cycling through the candidates."""
    specs, out = itertools.cycle([(8, 32), (3, 64), (2, 32), (4, 128), (4, 64)]), {}
    for i, block in enumerate(adapter.blocks(model)):
        for group in adapter.sequential:
            bits, size = next(specs)
            for name in group:
                w = block.get_submodule(name).weight.detach()
                spec = QuantSpec(bits, size, sym=True)
                out[adapter.block_prefix(i) + name] = quantize(w, *fit(w, spec), spec)
    return out


def _save_mixed(tiny, out):
    model, _, adapter, src = load_float_model(tiny)
    quantized = _mixed(model, adapter)
    units = [tuple(adapter.block_prefix(i) + n for n in g) for i in range(3) for g in adapter.sequential]
    mixed = {u: (quantized[u[0]].bits, quantized[u[0]].group_size) for u in units}
    return save_quantized(out, model, quantized, src, gptq_config(4, 128, True, mixed=mixed)), quantized


def test_a_mixed_checkpoint_reads_back_exactly_and_inspect_shows_each_layer(tiny, tmp_path):
    out, quantized = _save_mixed(tiny, tmp_path / "q")
    loaded = llmquant.load(out)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(quantized)
    for name, qw in quantized.items():
        back = layers[name].unpack()
        assert (back.bits, back.group_size) == (qw.bits, qw.group_size)
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(back, field), getattr(qw, field)), (name, field)
    info = hf.describe(out)
    assert info["mixed"] and info["layers"]["model.layers.0.self_attn.o_proj"]["bits"] == 3
    assert info["layers"]["model.layers.0.self_attn.o_proj"]["group_size"] == 64
    packed = sum(hf.packed_bytes(qw.in_features, qw.out_features, qw.bits, qw.group_size) for qw in quantized.values())
    assert info["bpw"] == pytest.approx(8 * packed / sum(qw.codes.numel() for qw in quantized.values()))
    where = {r["name"]: r for r in info["serving"]}
    assert not where["transformers (5.x, with optimum + gptqmodel)"]["loads"]
    assert not where["vLLM (0.34)"]["loads"]  # 2- and 3-bit layers: Marlin only takes 4 and 8
    # a checkpoint whose dynamic names other settings than its tensors have is refused, not misread
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has shape"):
        llmquant.load(out)


@pytest.mark.parametrize("dynamic, needle", [
    ({"+:model.(": {"bits": 4}}, "is not a pattern"),
    ({"+:model.*": {"bits": 5}}, "bits=5"),
    ({"+:model.*": {"group_size": 0}}, "group_size=0"),
    (["model"], "must map patterns"),
])
def test_bad_dynamic_is_one_line(tiny, tmp_path, dynamic, needle):
    out, _ = _save_mixed(tiny, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["dynamic"] = dynamic
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=needle):
        hf.read_quantization_config(out)


def test_uniform_checkpoints_keep_their_runtimes():
    q = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "checkpoint_format": "gptq",
         "dynamic": {"-:^model\\.layers\\.0\\.mlp\\.down_proj$": {}}}
    assert [r.loads for r in runtimes(q, [(256, 256)])] == [True, True, True, True]


# ------------------------------------------------------------------------------------------- the run

def test_target_bpw_run_meets_its_budget_and_loads(tiny, calib, tmp_path, capsys):
    config = QuantConfig(method="gptq", target_bpw=3.25, calib=str(calib), n_samples=8, seqlen=64)
    report = llmquant.quantize(tiny, config, tmp_path / "q", progress=False)
    info = hf.describe(tmp_path / "q")
    assert info["mixed"] and report.bpw == pytest.approx(info["bpw"]) and info["bpw"] <= 3.25
    settings = {(d["bits"], d["group_size"]) for d in info["layers"].values()}
    assert len(settings) > 1
    for i in range(3):  # what vLLM fuses shares one setting
        layers = [info["layers"][f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"]
        assert len({(d["bits"], d["group_size"]) for d in layers}) == 1
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["meta"]["target_bpw"] == 3.25
    record = json.loads((tmp_path / "q" / "quant_report.json").read_text())["allocation"]
    assert record["bytes"] <= record["budget_bytes"] and len(record["units"]) == 3 * 4
    assert sum(v["bytes"] for v in record["linears"].values()) == record["bytes"]
    for name, layer in info["layers"].items():  # inspect: predicted and achieved cost of each linear
        assert layer["predicted_kld"] > 0 and layer["kld_estimate"] > 0, name
        assert f"W{layer['bits']} g{layer['group_size']}" == record["linears"][name]["setting"]
    from llmquant.cli import main

    card = (tmp_path / "q" / "README.md").read_text()  # the card says what it is and who loads it
    assert "mixed-precision" in card and "target 3.25 bits per weight" in card and "GPTQModel.load(" in card
    assert "AutoModelForCausalLM" not in card
    main(["inspect", str(tmp_path / "q"), "--layers"])
    out = capsys.readouterr().out
    assert "mixed precision (per-layer settings in `dynamic`)" in out and "transformers" in out
    assert sum("predicted kld" in line and "kld estimate" in line for line in out.splitlines()) == len(info["layers"])
    # the packed model computes what its dequantized weights do
    loaded = llmquant.load_any(tmp_path / "q", exact=True)[0]
    model = load_float_model(tiny)[0].float()
    for name, module in loaded.named_modules():
        if isinstance(module, QuantLinear):
            model.get_submodule(name).weight.data = module.unpack().dequantize()
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


def test_dry_run_allocation_prints_the_plan_and_writes_nothing(tiny, calib, tmp_path, capsys):
    from llmquant.cli import main

    code = main(["quantize", str(tiny), "--target-bpw", "4", "--calib", str(calib), "--n-samples", "4",
                 "--seqlen", "32", "--dry-run-allocation", "--out", str(tmp_path / "q")])
    out, err = capsys.readouterr()
    assert code in (0, None) and not (tmp_path / "q").exists()
    assert "model.layers.2.mlp.down_proj" in out and "bits per weight" in out.splitlines()[-1]


@pytest.mark.parametrize("argv, needle", [
    (["--target-bpw", "1.5"], "outside what the choices can meet"),
    (["--target-bpw", "12"], "outside what the choices can meet"),
    (["--target-bpw", "4", "--format", "awq"], "awq (GEMM)"),
    (["--dry-run-allocation"], "--dry-run-allocation prints the plan of --target-bpw"),
])
def test_bad_budgets_are_one_line(tiny, calib, tmp_path, capsys, argv, needle):
    from llmquant.cli import main

    code = main(["quantize", str(tiny), "--calib", str(calib), "--n-samples", "4", "--seqlen", "32", *argv,
                 "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmquant: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "q").exists()
