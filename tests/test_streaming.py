"""The streaming pipeline: checkpoints read block by block from their shards, activations within a memory
budget, outputs written as blocks finish, and bad input refused in one line with nothing written."""

import json
import random
import shutil

import gguf
import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from llmquant.config import QuantConfig
from llmquant.formats import shards
from llmquant.memory import Budget
from llmquant.methods import make_solver
from llmquant.models.checkpoint import Checkpoint
from llmquant.models.loader import load_float_model
from llmquant.runner import run_layers
from test_cli import assert_one_line_error, run
from tiny import make_tiny_model

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


def copy_checkpoint(src, dst, dtype=None, max_shard_size=None):
    """The same model stored in `dtype` (config.json unchanged), in shards of at most `max_shard_size` bytes."""
    dst.mkdir(parents=True)
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    state = load_file(src / "model.safetensors")
    state = {k: v.to(dtype) if dtype is not None else v for k, v in state.items()}
    if max_shard_size is None:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    assert split.is_sharded
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, dst / filename, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": split.tensor_to_filename}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def four_block_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("streaming") / "llama", layers=4)


@pytest.fixture(scope="module")
def sharded_bf16(four_block_model, tmp_path_factory):
    """bf16 shards of a model whose config.json says float32."""
    return copy_checkpoint(four_block_model, tmp_path_factory.mktemp("sharded") / "m", torch.bfloat16, 60_000)


def test_sharded_bf16_checkpoint_quantizes_like_the_single_file(four_block_model, sharded_bf16, tmp_path, capsys):
    single = copy_checkpoint(four_block_model, tmp_path / "single", torch.bfloat16)
    assert json.loads((sharded_bf16 / "config.json").read_text()).get("torch_dtype", "float32") != "bfloat16"
    assert len(list(sharded_bf16.glob("*.safetensors"))) > 2
    for src, out in ((single, tmp_path / "a"), (sharded_bf16, tmp_path / "b")):
        code, _, err = run(capsys, "quantize", src, "--method", "rtn", "--bits", 4, "--group-size", 32,
                           "--out", out)
        assert code == 0, err
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # float tensors come out in config.json's dtype, as from_pretrained(dtype="auto") would give them
    assert load_file(tmp_path / "b" / "model.safetensors")["model.norm.weight"].dtype == torch.float32


def test_one_decoder_block_is_in_memory_at_a_time(four_block_model, calib, tmp_path, monkeypatch):
    """Blocks are read right before they are solved and released once emitted; the rest stay on meta."""
    import llmquant

    held, most = set(), []
    materialize, release = Checkpoint.materialize, Checkpoint.release

    def counting_materialize(self, module, prefix, *args, **kwargs):
        if prefix.startswith("model.layers."):
            held.add(prefix)
            most.append(len(held))
            layers = self.model.model.layers
            assert sum(not next(b.parameters()).is_meta for b in layers) <= 1
        return materialize(self, module, prefix, *args, **kwargs)

    def counting_release(self, module):
        held.difference_update({p for p in held if module is self.model.get_submodule(p.rstrip("."))})
        return release(self, module)

    monkeypatch.setattr(Checkpoint, "materialize", counting_materialize)
    monkeypatch.setattr(Checkpoint, "release", counting_release)
    config = QuantConfig(method="gptq", bits=4, group_size=32, calib=str(calib), n_samples=4, seqlen=32)
    llmquant.quantize(four_block_model, config, tmp_path / "q", progress=False)
    assert len(most) == 4 and max(most) == 1 and not held


def test_sharded_writer_writes_what_save_file_writes(tmp_path):
    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16, torch.int32, torch.float16, torch.uint8]
    tensors = {f"layer.{i}.{kind}": torch.randn(rng.randint(1, 40), rng.randint(1, 40)).to(rng.choice(dtypes))
               for i in range(12) for kind in ("weight", "bias")}
    plan = {name: shards.Planned(t.dtype, t.shape) for name, t in tensors.items()}
    writer = shards.ShardedWriter(tmp_path, plan, max_shard_size=4000)
    for name in rng.sample(list(tensors), len(tensors)):  # any order
        writer.put(name, tensors[name])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=4000)
    assert index["weight_map"] == split.tensor_to_filename
    for filename, names in split.filename_to_tensors.items():
        expected = tmp_path / f"expected-{filename}"
        save_file({n: tensors[n] for n in names}, expected, metadata={"format": "pt"})
        assert (tmp_path / filename).read_bytes() == expected.read_bytes(), filename


def test_activations_beyond_the_budget_are_memory_mapped(four_block_model, tmp_path, capsys):
    """Same results whether the activations sit in memory or in memory-mapped files; the files go at the end."""
    samples = torch.randint(0, 300, (64, 48), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(method="gptq", bits=3, group_size=32, float_targets=True)
    results = []
    for spill in (None, tmp_path / "spill"):
        model, _, adapter, _ = load_float_model(four_block_model)
        targets = {adapter.block_prefix(i) + n for i in range(4) for n in adapter.linears()}
        params = sum(p.numel() for p in adapter.blocks(model)[0].parameters())
        budget = Budget(2**40, params, 0)
        if spill is not None:  # room for one block and its batch, not for the activations
            spill.mkdir()
            budget = Budget(0, params, 0)
            budget.limit = budget.block + 2**16
        solver = make_solver(config, config.spec())
        results.append(run_layers(model, adapter, solver, targets, samples, batch_tokens=96, budget=budget,
                                  spill_dir=spill))
        err = capsys.readouterr().err
        assert ("memory-mapped" in err) == (spill is not None), err
    assert results[0].keys() == results[1].keys()
    for name, qw in results[0].items():
        assert torch.equal(qw.codes, results[1][name].codes) and torch.equal(qw.scales, results[1][name].scales)
    assert list((tmp_path / "spill").iterdir()) == []


def _edit_index(path, edit):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    edit(index["weight_map"])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _missing_shard(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    (path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    return ["is missing"]


def _tensor_not_in_its_shard(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.up_proj.weight"
    other = next(f for f in sorted(set(index.values())) if f != index[name])
    _edit_index(path, lambda m: m.update({name: other}))
    return [name, "does not hold it"]


def _truncated_shard(path):
    shard = sorted(path.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return [shard.name, "not a valid safetensors file"]


def _shape_disagrees_with_config(path):
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    return ["mlp", "shape", "config.json"]


def _config_edit(**values):
    def damage(path):
        config = json.loads((path / "config.json").read_text())
        config.update(values)
        (path / "config.json").write_text(json.dumps(config))
        return ["config.json"]

    damage.__name__ = "_" + "_".join(f"{k}={v}" for k, v in values.items())
    return damage


def _hidden_size_missing(path):
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    return ["config.json"]


@pytest.mark.parametrize("damage", [_missing_shard, _tensor_not_in_its_shard, _truncated_shard,
                                    _shape_disagrees_with_config, _config_edit(num_attention_heads=3),
                                    _config_edit(num_hidden_layers=0), _config_edit(hidden_size=-4),
                                    _config_edit(hidden_size=10**12), _hidden_size_missing])
def test_bad_checkpoints_get_one_line_and_nothing_written(damage, sharded_bf16, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_bf16, broken)
    needles = damage(broken)
    out = tmp_path / "out"
    for argv in (["--method", "rtn"], ["--format", "gguf", "--gguf-type", "Q8_0"]):
        assert_one_line_error(*run(capsys, "quantize", broken, *argv, "--out", out)[::2], *needles)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_budget_too_small_says_how_much_is_needed(four_block_model, calib, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", four_block_model, "--method", "gptq", "--calib", calib,
                       "--max-memory", "100MB", "--out", out)
    assert_one_line_error(code, err, "--max-memory", "too small", "need about", "GiB")
    assert_one_line_error(*run(capsys, "quantize", four_block_model, "--method", "rtn", "--max-memory", "lots", "--out", out)[::2],
                          "--max-memory", "lots")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["gptq", "gguf"])
def test_disk_full_during_the_write_keeps_the_previous_output(fmt, four_block_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    argv = ["quantize", four_block_model, "--method", "rtn", "--format", fmt, "--out", out, "--force"]
    argv += ["--gguf-type", "Q8_0"] if fmt == "gguf" else ["--group-size", "32"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    calls = {"n": 0}

    def full_after_a_while(*args, **kwargs):  # the header and some blocks fit, then the disk is full
        calls["n"] += 1
        if calls["n"] > 6:
            disk_full()
        return real(*args, **kwargs)

    if fmt == "gguf":
        real = gguf.GGUFWriter.write_tensor_data
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_after_a_while)
    else:
        real = shards.os.pwrite
        monkeypatch.setattr(shards.os, "pwrite", full_after_a_while)
    assert_one_line_error(*run(capsys, *argv)[::2], "No space left on device")
    assert calls["n"] > 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    after = {p.name: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())}
    assert after == before


def test_too_little_disk_is_refused_before_the_work(four_block_model, tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    from llmquant.formats.gguf import writer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out.gguf"
    assert_one_line_error(*run(capsys, "quantize", four_block_model, "--method", "rtn", "--format", "gguf", "--gguf-type", "Q8_0",
                               "--out", out)[::2], "needs about", "GiB are free")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_activations_stay_on_the_host_and_each_batch_goes_to_the_work_device(device, four_block_model, calib,
                                                                             tmp_path, capsys, monkeypatch):
    """Only the block and one batch need to be on a GPU: the activation streams (hidden and float reference)
    live on the host, and every block forward (propagation, float targets, tuning) gets its batch on the work
    device. On the CPU the same code runs with both on the host."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the CPU twin of this test checks the same code path")
    from llmquant import runner

    streams, forwards = [], set()
    real_capture = runner.capture_inputs

    def capture(*args, **kwargs):
        inputs = real_capture(*args, **kwargs)
        streams.append((inputs.hidden.device.type, inputs.device.type))
        return inputs

    def where(module, args, kwargs):
        if type(module).__name__.endswith("DecoderLayer"):
            hidden = args[0] if args else kwargs["hidden_states"]
            forwards.add(hidden.device.type)

    monkeypatch.setattr(runner, "capture_inputs", capture)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: where(m, a, {}))
    try:
        code, _, err = run(capsys, "quantize", four_block_model, "--method", "gptq", "--bits", 4, "--group-size", 32,
                           "--float-targets", "--tune-iters", 2, "--calib", calib, "--n-samples", 8, "--seqlen", 64,
                           "--device", device, "--out", tmp_path / "out")
    finally:
        hook.remove()
    assert code == 0, err
    assert streams == [("cpu", device)] and forwards == {device}
