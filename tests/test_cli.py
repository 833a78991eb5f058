import json

import pytest
import torch

from llmquant.cli import main
from tiny import make_tiny_model, sample_text


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("llmquant: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(sample_text(6000, seed=1))
    return path


def test_quantize_inspect_eval_generate(tiny_model_dir, tmp_path, text_file, capsys):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--bits", 4, "--group-size", 32, "--asym",
                          "--out", out, "--eval", "--eval-data", text_file, "--eval-seqlen", 64,
                          "--eval-windows", 4, "--prompt-tokens", 16, "--new-tokens", 4, "--json")
    assert code == 0
    report = json.loads(stdout)
    speed = report["speed"]
    assert speed["model"]["path"] == str(out) and [b["dtype"] for b in speed["base"]] == ["bfloat16", "float32"]
    assert speed["model"]["decode_tokens_per_s"] > 0 and speed["decode_speedup"] > 0
    assert 0 < speed["model"]["rss_loaded_bytes"] <= speed["model"]["peak_rss_bytes"]
    assert report["quantized_linears"] == 14 and report["bits"] == 4 and report["sym"] is False
    assert 4 < report["bpw"] < 6 and report["eval"]["windows"] == 4
    assert report["eval"]["kld"] > 0 and 0 < report["eval"]["top1"] <= 1

    code, stdout, _ = run(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["quantized_linears"] == 14 and info["group_size"] == 32

    code, stdout, _ = run(capsys, "eval", out, "--data", text_file, "--seqlen", 64, "--windows", 4,
                          "--base", tiny_model_dir, "--json")
    assert code == 0
    again = json.loads(stdout)
    assert again["ppl"] == pytest.approx(report["eval"]["ppl"], rel=1e-6)
    assert again["kld"] == pytest.approx(report["eval"]["kld"], rel=1e-5)

    code, _, err = run(capsys, "generate", out, "--prompt", "the king", "--max-new-tokens", 5)
    assert code == 0 and "tokens/s" in err


def test_bench_measures_a_model_beside_its_base_and_refuses_what_it_cannot_compare(tiny_model_dir, tmp_path,
                                                                                 capsys):
    code, stdout, _ = run(capsys, "bench", tiny_model_dir, "--prompt-tokens", 8, "--new-tokens", 3)
    assert code == 0 and "decode" in stdout and "float32" in stdout and "against the base" not in stdout
    other = tmp_path / "other-vocab"
    other.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not a model")
    cases = [
        (["bench", not_a_model], ["notes.txt"]),
        (["bench", tmp_path / "missing"], ["no such model"]),
        (["bench", tiny_model_dir, "--base", other], ["vocabulary", "tokenizer"]),
        (["bench", tiny_model_dir, "--prompt-tokens", 600], ["600", "context of 512"]),
        (["bench", tiny_model_dir, "--new-tokens", 1], ["--new-tokens"]),
        (["bench", tiny_model_dir, "--device", "tpu"], ["--device"]),
    ]
    for argv, needles in cases:
        assert_one_line_error(*run(capsys, *argv)[::2], *needles)


def test_bench_runs_a_gguf_file_in_its_blocks_beside_its_base(tiny_model_dir, tmp_path, capsys):
    """The file's vocabulary (an array longer than the header summary shows) is compared with the base's."""
    out = tmp_path / "q.gguf"
    assert run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--format", "gguf", "--gguf-type", "Q8_0",
               "--out", out)[0] == 0
    code, stdout, _ = run(capsys, "bench", out, "--base", tiny_model_dir, "--prompt-tokens", 8, "--new-tokens", 3,
                          "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["model"]["decode_tokens_per_s"] > 0 and report["decode_speedup"] > 0 and len(report["base"]) == 2


@pytest.mark.slow
def test_bench_with_a_compiled_decode_step(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q8"
    assert run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--bits", 8, "--group-size", 32, "--asym", "--out", out)[0] == 0
    code, stdout, _ = run(capsys, "bench", out, "--prompt-tokens", 8, "--new-tokens", 6, "--compile", "--json")
    assert code == 0
    model = json.loads(stdout)["model"]
    assert model["compiled"] and model["decode_tokens_per_s"] > 0 and model["warmup_s"] > model["ttft_s"]
    code, _, err = run(capsys, "generate", out, "--prompt", "the king", "--max-new-tokens", 5, "--compile")
    assert code == 0 and "decode 5 tokens" in err


def test_lower_bits_cost_more_quality(tiny_model_dir, tmp_path, text_file, capsys):
    kld = {}
    for bits in (8, 2):
        run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--bits", bits, "--group-size", 32, "--asym", "--out",
            tmp_path / str(bits))
        code, stdout, _ = run(capsys, "eval", tmp_path / str(bits), "--data", text_file, "--seqlen", 64,
                              "--windows", 3, "--base", tiny_model_dir, "--json")
        kld[bits] = json.loads(stdout)["kld"]
    assert 0 < kld[8] < kld[2] / 50


def test_gptq_defaults_to_act_order_static_groups_and_mse_clip(tiny_model_dir, tmp_path, text_file, capsys):
    """Act-order with static groups and the mse range search are GPTQ's defaults: the checkpoint keeps
    g_idx = i // group_size."""
    from safetensors import safe_open

    runs = {"default": [], "explicit": ["--act-order", "--static-groups", "--clip", "mse"],
            "plain": ["--no-act-order"], "permuted": ["--no-static-groups"], "minmax": ["--clip", "minmax"]}
    for name, extra in runs.items():
        code, _, err = run(capsys, "quantize", tiny_model_dir, "--method", "gptq", "--bits", 3, "--group-size", 32,
                           "--asym", "--calib", text_file, "--n-samples", 8, "--seqlen", 64, *extra,
                           "--out", tmp_path / name)
        assert code == 0, err
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in runs}
    assert weights["default"] == weights["explicit"] != weights["plain"]
    assert weights["minmax"] != weights["default"]
    configs = {name: json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
               for name in runs}
    assert configs["default"]["static_groups"] and not configs["default"]["desc_act"]
    assert configs["default"]["meta"]["clip"] == "mse" and configs["minmax"]["meta"]["clip"] == "minmax"
    assert configs["permuted"]["desc_act"] and not configs["plain"]["desc_act"]
    for name, in_order in (("default", True), ("permuted", False)):
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            g_idx = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
        assert torch.equal(g_idx, torch.arange(len(g_idx), dtype=g_idx.dtype) // 32) == in_order


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    nan = make_tiny_model(root / "nan")
    from safetensors.torch import load_file, save_file

    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    gpt2 = root / "gpt2"
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                          vocab_size=100)).save_pretrained(gpt2)
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((nan / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    empty = root / "empty"
    empty.mkdir()
    truncated = root / "truncated"
    truncated.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (nan / name).exists():
            (truncated / name).write_bytes((nan / name).read_bytes())
    (truncated / "model.safetensors").write_bytes((nan / "model.safetensors").read_bytes()[:5000])
    return {"nan": nan, "gpt2": gpt2, "pickled": pickled, "empty": empty, "truncated": truncated}


def test_bad_input_gives_one_line_errors(tiny_model_dir, broken_models, tmp_path, capsys):
    out = tmp_path / "out"
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("a file")
    cases = [
        (["quantize", tmp_path / "missing", "--method", "rtn", "--out", out], ["no such model directory"]),
        (["quantize", "--method", "rtn", broken_models["empty"], "--out", out], ["no config.json"]),
        (["quantize", "--method", "rtn", broken_models["gpt2"], "--out", out], ["'gpt2'", "llama", "mistral", "qwen2", "qwen3"]),
        (["quantize", "--method", "rtn", broken_models["nan"], "--out", out], ["model.layers.1.mlp.up_proj.weight", "NaN"]),
        (["quantize", "--method", "rtn", broken_models["pickled"], "--out", out], ["pytorch_model.bin", "pickled"]),
        (["quantize", tiny_model_dir, "--bits", 5, "--out", out], ["5"]),
        (["quantize", tiny_model_dir, "--group-size", 0, "--out", out], ["group size"]),
        (["quantize", tiny_model_dir, "--n-samples", 0, "--out", out], ["--n-samples"]),
        (["quantize", tiny_model_dir, "--format", "exl2", "--out", out], ["exl2"]),
        (["quantize", tiny_model_dir, "--method", "awq", "--float-targets", "--out", out], ["--float-targets", "gptq"]),
        (["quantize", tiny_model_dir, "--method", "rtn", "--act-order", "--out", out], ["--act-order", "gptq"]),
        (["quantize", tiny_model_dir, "--method", "awq", "--tune-iters", 5, "--out", out], ["--tune-iters", "gptq"]),
        (["quantize", tiny_model_dir, "--method", "gptq", "--tune-iters", -1, "--out", out], ["--tune-iters"]),
        (["quantize", tiny_model_dir, "--method", "gptq", "--no-awq-clip", "--out", out], ["--no-awq-clip", "awq"]),
        (["quantize", tiny_model_dir, "--method", "awq", "--awq-search", "gptq", "--out", out],
         ["--awq-search gptq", "awq+gptq"]),
        (["quantize", tiny_model_dir, "--method", "gptq", "--format", "gguf", "--act-order", "--out",
          tmp_path / "out.gguf"],
         ["GGUF", "--act-order"]),
        (["quantize", "--method", "rtn", broken_models["truncated"], "--out", out], ["model.safetensors"]),
        # paths that would only fail once the work is done, or would destroy an input
        (["quantize", tiny_model_dir, "--out", not_a_dir / "q"], ["is not a directory"]),
        (["quantize", tiny_model_dir, "--out", tiny_model_dir, "--force"], ["would replace the model"]),
        (["quantize", tiny_model_dir, "--out", out, "--work-dir", not_a_dir], ["--work-dir", "not a directory"]),
        (["quantize", tiny_model_dir, "--out", out, "--work-dir", out / "work"], ["inside --out"]),
        (["quantize", tiny_model_dir, "--out", out, "--work-dir", tiny_model_dir], ["inside the model"]),
        (["quantize", tiny_model_dir, "--out", out, "--max-memory", "2 lots"], ["--max-memory"]),
    ]
    for argv, needles in cases:
        assert_one_line_error(*run(capsys, *argv)[::2], *needles)
        assert not out.exists()
    out.mkdir()
    assert_one_line_error(*run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--out", out)[::2], "--force")
    short = tmp_path / "short.txt"
    short.write_text("the king")
    assert_one_line_error(*run(capsys, "eval", tiny_model_dir, "--data", short, "--seqlen", 64)[::2], "64")
    assert_one_line_error(*run(capsys, "inspect", tiny_model_dir)[::2], "not a quantized checkpoint")
    assert_one_line_error(*run(capsys, "eval", tiny_model_dir, "--data", short, "--device", "tpu")[::2], "--device")
    assert_one_line_error(*run(capsys, "generate", tiny_model_dir, "--prompt", "hi", "--device", "tpu")[::2],
                          "--device")
    assert_one_line_error(*run(capsys, "generate", tiny_model_dir, "--prompt", "hi", "--chat")[::2], "chat template")
    for n in (0, -1):
        assert_one_line_error(*run(capsys, "generate", tiny_model_dir, "--prompt", "hi", "--max-new-tokens", n)[::2],
                              "--max-new-tokens")
    assert_one_line_error(*run(capsys, "generate", tiny_model_dir, "--prompt", " ")[::2], "--prompt")


def test_failures_of_the_machine_are_one_line_and_bugs_keep_their_traceback(tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """One place (errors.one_line) turns what a user can act on into a line; anything else is a bug to see."""
    import errno

    from llmquant.models import checkpoint
    from llmquant.quant.rtn import RTNSolver

    out = tmp_path / "out"
    quantize = ["quantize", tiny_model_dir, "--method", "rtn", "--out", out]

    def raising(err):
        def fail(*args, **kwargs):
            raise err
        return fail

    monkeypatch.setattr(RTNSolver, "quantize", raising(MemoryError()))
    assert_one_line_error(*run(capsys, *quantize)[::2], "out of host memory", "--max-memory")
    monkeypatch.setattr(RTNSolver, "quantize", raising(OSError(errno.EIO, "Input/output error", "/mnt/x/model")))
    assert_one_line_error(*run(capsys, *quantize)[::2], "/mnt/x/model: Input/output error")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(RTNSolver, "quantize", raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main([str(a) for a in quantize])
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint, "safe_open", raising(PermissionError(errno.EACCES, "Permission denied",
                                                                         "model.safetensors")))
    assert_one_line_error(*run(capsys, *quantize)[::2], "model.safetensors", "Permission denied")
    assert not out.exists()


def test_non_finite_values_in_a_packed_checkpoint_or_gguf_are_refused_by_name(tiny_model_dir, tmp_path, text_file,
                                                                               capsys):
    """What would make every result wrong is refused where it is read, naming the file and the tensor."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import save_file

    packed, file = tmp_path / "packed", tmp_path / "q.gguf"
    assert run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--group-size", 32, "--out", packed)[0] == 0
    assert run(capsys, "quantize", tiny_model_dir, "--method", "rtn", "--format", "gguf", "--gguf-type", "Q8_0", "--out", file)[0] == 0
    weights = packed / "model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["model.layers.1.self_attn.o_proj.scales"][0, 1] = float("inf")
    save_file(tensors, weights, metadata=meta)
    assert_one_line_error(*run(capsys, "eval", packed, "--data", text_file, "--seqlen", 64)[::2],
                          str(weights), "model.layers.1.self_attn.o_proj.scales", "NaN or Inf")
    norm = next(t for t in gguf.GGUFReader(file).tensors if t.name == "blk.0.attn_norm.weight")
    with open(file, "r+b") as f:
        f.seek(int(norm.data_offset) + 4 * 3)
        f.write(np.array([np.nan], dtype=np.float32).tobytes())
    assert_one_line_error(*run(capsys, "eval", file, "--data", text_file, "--seqlen", 64)[::2],
                          str(file), "blk.0.attn_norm.weight", "NaN or Inf")


def test_runs_from_the_checkout_root_without_shadowing_the_hubs_kernels():
    """`python -m ...` in the checkout puts its root first on sys.path, where kernels/ would pass for the Hub's
    `kernels` package that transformers imports on every model load (lm-eval's CLI, too, imports no llmquant)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import kernels, transformers.integrations.hub_kernels, llmquant.kernels.gptq; print(kernels.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert Path(run.stdout.strip()).parent != root / "kernels"
