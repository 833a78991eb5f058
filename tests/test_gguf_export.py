"""GGUF export: mix rules, the file as independent readers see it (gguf's reader and dequantizers,
transformers' GGUF loader), our reader, imatrix weighting, and bad input from the command line."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from tiny import make_tiny_model, sample_text

from llmquant.api import QuantConfig, load_any, quantize
from llmquant.cli import main
from llmquant.errors import UserError
from llmquant.formats.gguf.mixes import TensorInfo, parse_overrides, tensor_types
from llmquant.formats.gguf.reader import describe_gguf, load_gguf
from llmquant.formats.gguf.writer import permute_rows, unpermute_rows

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _llama_tensors(layers: int, width: int, ffn: int, tied: bool = False) -> list[TensorInfo]:
    out = [TensorInfo("token_embd.weight", (32000, width))]
    for i in range(layers):
        for name, shape in [("attn_q", (width, width)), ("attn_k", (width // 4, width)), ("attn_v", (width // 4, width)),
                            ("attn_output", (width, width)), ("ffn_gate", (ffn, width)), ("ffn_up", (ffn, width)),
                            ("ffn_down", (width, ffn)), ("attn_norm", (width,)), ("ffn_norm", (width,))]:
            out.append(TensorInfo(f"blk.{i}.{name}.weight", shape))
    out.append(TensorInfo("output_norm.weight", (width,)))
    if not tied:
        out.append(TensorInfo("output.weight", (32000, width)))
    return out


def _more_bits(i: int, n: int) -> bool:  # written from REFERENCE.md's statement of use_more_bits
    return i < n / 8 or i >= 7 * n / 8 or (i - n / 8) % 3 == 2


def test_q4_k_m_rules_on_a_32_layer_model():
    types = tensor_types(_llama_tensors(32, 4096, 14336), "Q4_K_M", n_gqa=4, tied=False)
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert types["blk.0.attn_norm.weight"] == T.F32
    for i in range(32):
        more = T.Q6_K if _more_bits(i, 32) else T.Q4_K
        assert types[f"blk.{i}.attn_v.weight"] == more and types[f"blk.{i}.ffn_down.weight"] == more
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == T.Q4_K


def test_low_bit_mix_rules():
    q2 = tensor_types(_llama_tensors(32, 4096, 14336), "Q2_K", n_gqa=4, tied=False)
    assert q2["blk.5.attn_v.weight"] == T.Q4_K and q2["blk.5.ffn_down.weight"] == T.Q3_K
    assert q2["blk.5.attn_output.weight"] == T.Q3_K and q2["blk.5.attn_q.weight"] == T.Q2_K
    assert tensor_types(_llama_tensors(32, 4096, 14336), "Q2_K", n_gqa=1, tied=False)["blk.5.attn_v.weight"] == T.Q3_K
    q3 = tensor_types(_llama_tensors(32, 4096, 14336), "Q3_K_M", n_gqa=4, tied=False)
    assert [q3[f"blk.{i}.attn_v.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert q3["blk.1.ffn_down.weight"] == T.Q5_K and q3["blk.2.ffn_down.weight"] == T.Q4_K
    assert q3["blk.9.attn_output.weight"] == T.Q4_K


def test_rows_not_a_multiple_of_256_fall_back_as_llama_cpp_does():
    """SmolLM2-135M: width 576 (not 256-divisible), ffn 1536 (divisible), tied embeddings."""
    types = tensor_types(_llama_tensors(30, 576, 1536, tied=True), "Q4_K_M", n_gqa=3, tied=True)
    assert types["token_embd.weight"] == T.Q8_0  # output rules (tied), 576 % 256 -> Q8_0
    assert types["blk.3.attn_q.weight"] == T.Q5_0  # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == T.Q8_0  # Q6_K -> Q8_0
    assert types["blk.0.ffn_down.weight"] == T.Q6_K and types["blk.4.ffn_down.weight"] == T.Q4_K
    q2 = tensor_types(_llama_tensors(30, 576, 1536, tied=True), "Q2_K", n_gqa=3, tied=True)
    assert q2["blk.3.attn_q.weight"] == T.Q4_0 and q2["blk.3.ffn_down.weight"] == T.Q3_K


def test_tensor_type_overrides_win_and_bad_ones_are_refused():
    types = tensor_types(_llama_tensors(4, 4096, 14336), "Q4_K_M", n_gqa=4, tied=False,
                         overrides=parse_overrides([r"attn_v=q8_0", r"blk\.[01]\.ffn_up=Q5_K"]))
    assert all(types[f"blk.{i}.attn_v.weight"] == T.Q8_0 for i in range(4))
    assert types["blk.0.ffn_up.weight"] == T.Q5_K and types["blk.2.ffn_up.weight"] == T.Q4_K
    for bad in ["attn_v", "attn_v=Q9_K", "(=Q4_0"]:
        with pytest.raises(UserError):
            parse_overrides([bad])


def test_rotary_row_permutation_round_trips_on_values_and_bytes():
    w = torch.randn(8 * 64, 32)
    assert torch.equal(unpermute_rows(permute_rows(w, 8), 8), w)
    # pairs (i, i + half) of each head end up adjacent
    assert torch.equal(permute_rows(w, 8)[1], w[32]) and torch.equal(permute_rows(w, 8)[2], w[1])
    raw = np.arange(8 * 64 * 3, dtype=np.uint8).reshape(8 * 64, 3)
    assert np.array_equal(permute_rows(raw, 8), permute_rows(torch.from_numpy(raw), 8).numpy())


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """Tiny models with 256-wide rows, so K-types apply as they do in real models."""
    root = tmp_path_factory.mktemp("wide")
    # directories not named after the family: transformers' GGUF loader guesses Mistral from general.name
    return {f: make_tiny_model(root / f"model{i}", f, hidden=256, intermediate=512, heads=4, kv_heads=2,
                               tie=f == "qwen2") for i, f in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", FAMILIES)
def test_file_reads_the_same_in_gguf_and_transformers(family, wide_models, tmp_path):
    """The gguf package decodes our bytes to our values; transformers' own GGUF loader (its name map,
    its q/k un-permutation) rebuilds weights equal to the ones our reader returns."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m.gguf"
    quantize(wide_models[family], QuantConfig(method="rtn", format="gguf", gguf_type="Q4_K_M"), out, progress=False)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == {"mistral": "llama"}.get(family, family)
    ours, _ = load_gguf(out)
    names = {t.name: t for t in reader.tensors}
    assert names["blk.0.attn_q.weight"].tensor_type == T.Q4_K
    assert names["blk.0.attn_norm.weight"].tensor_type == T.F32
    # our config: transformers' GGUF config mapping would take Qwen3's default head_dim (128) here
    theirs = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32,
                                                  config=ours.config)
    theirs_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        if name.endswith("inv_freq"):
            continue
        assert torch.equal(value, theirs_state[name]), name
    from llmquant.numerics.ggml import CODECS

    t = names["blk.1.ffn_down.weight"]
    raw = np.array(t.data)  # [rows, row bytes]
    ggml = gguf.quants.dequantize(raw, t.tensor_type)
    assert np.array_equal(CODECS[t.tensor_type.name].dequantize(torch.from_numpy(raw), int(t.shape[0])).numpy(), ggml)


def test_q8_0_file_scores_like_the_float_model(tiny_model_dir, tmp_path):
    out = tmp_path / "q8.gguf"
    quantize(tiny_model_dir, QuantConfig(method="rtn", format="gguf", gguf_type="Q8_0"), out, progress=False)
    model, tok = load_any(out)
    base, _ = load_any(tiny_model_dir, exact=True)
    ids = tok(sample_text(60, seed=3), return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, base(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    info = describe_gguf(out)
    assert info["mix"] == "Q8_0" and info["tensor_types"] == {"Q8_0": 2 * 7 + 2} and 8.4 < info["bpw"] < 8.6


def test_imatrix_lowers_the_activation_weighted_error(wide_models, tmp_path):
    """llama.cpp's imatrix objective: sum_j E[x_j^2] (W - Q)_ij^2. Weighting the fit by it must lower it."""
    from llmquant.quant.ggml_solver import SquareMean

    path = wide_models["llama"]
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(6000, seed=1))
    files = {}
    for method in ("rtn", "imatrix"):
        files[method] = tmp_path / f"{method}.gguf"
        config = QuantConfig(method=method, format="gguf", gguf_type="Q3_K_S", calib=str(calib), n_samples=16,
                             seqlen=64)
        quantize(path, config, files[method], progress=False)
    base, tok = load_any(path, exact=True)
    stats = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: stats.setdefault(n, SquareMean(a[0].shape[-1], "cpu"))
                                          .add(a[0])) for n, m in base.named_modules()
             if isinstance(m, torch.nn.Linear) and "layers" in n]
    with torch.no_grad():
        base(tok(sample_text(800, seed=1), return_tensors="pt").input_ids[:, :256])
    for h in hooks:
        h.remove()
    errors = {}
    for method, f in files.items():
        q, _ = load_any(f, exact=True)
        qs = dict(q.named_modules())
        with torch.no_grad():
            errors[method] = sum(float(((qs[n].weight - m.weight) ** 2 * stats[n].value).sum())
                                 for n, m in base.named_modules() if n in stats)
    assert errors["imatrix"] < 0.95 * errors["rtn"], errors


def test_gguf_command_line_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "ok.gguf"
    assert main(["quantize", str(tiny_model_dir), "--method", "rtn", "--format", "gguf", "--gguf-type", "Q4_0", "--out", str(good)]) == 0
    capsys.readouterr()
    cases = [
        (["quantize", str(tiny_model_dir), "--method", "rtn", "--format", "gguf", "--gguf-type", "Q9_K", "--out", str(tmp_path / "x")],
         "unknown --gguf-type"),
        (["quantize", str(tiny_model_dir), "--format", "gguf", "--method", "awq+gptq", "--out", str(tmp_path / "x")],
         "--format gguf takes --method"),
        (["quantize", str(tiny_model_dir), "--method", "imatrix", "--out", str(tmp_path / "x")], "with --format gguf"),
        (["quantize", str(tiny_model_dir), "--method", "rtn", "--format", "gguf", "--out", str(good)], "exists"),
        (["quantize", str(tiny_model_dir), "--method", "rtn", "--format", "gguf", "--tensor-type", "v", "--out", str(tmp_path / "x")],
         "PATTERN=TYPE"),
    ]
    raw = good.read_bytes()
    for cut, name in [(len(raw) // 2, "half.gguf"), (30, "head.gguf")]:
        (tmp_path / name).write_bytes(raw[:cut])
        cases += [(["inspect", str(tmp_path / name)], str(tmp_path / name)),
                  (["eval", str(tmp_path / name), "--data", str(tmp_path / "t.txt")], str(tmp_path / name))]
    (tmp_path / "t.txt").write_text(sample_text(3000))
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + raw[4:200])
    cases.append((["inspect", str(tmp_path / "magic.gguf")], "magic"))
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and fragment in err and err.startswith("llmquant: error:"), (argv, err)
    assert not [p for p in tmp_path.iterdir() if re.match(r"\..*incomplete", p.name)]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_write_files_that_read_back(method, wide_models, tmp_path):
    """GPTQ on the block grids and AWQ-scaled weights: valid files whose decoded weights the model in
    memory computed with (the runner wrote them back), and a quant report per linear for GPTQ."""
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text(4000, seed=2))
    out = tmp_path / f"{method}.gguf"
    report = quantize(wide_models["qwen3"], QuantConfig(method=method, format="gguf", gguf_type="Q3_K_M",
                                                        calib=str(calib), n_samples=8, seqlen=64), out, progress=False)
    assert report.quantized_linears == 14 and report.gguf_types["blk.1.attn_v.weight"] == "Q5_K"
    model, _ = load_gguf(out)
    reader = gguf.GGUFReader(out)
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_output.weight")
    expected = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
    assert np.array_equal(model.model.layers[1].self_attn.o_proj.weight.detach().numpy(), expected)
