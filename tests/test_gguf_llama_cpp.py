"""llama.cpp itself on our GGUF files of the demo model (slow: run with `-m slow`).

Needs llama.cpp built by `bash scripts/build_llama_cpp.sh` (the fixture runs it; ~10 min the first
time, cached outside the repo) and the Python binding without its own build, pointed at that one:
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install --no-deps llama-cpp-python==0.3.36 diskcache
(the fixture sets LLAMA_CPP_LIB_PATH). Both fail loudly if missing rather than skip.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llmquant.api import QuantConfig, quantize
from tiny import FAMILY_EXTRA, NO_GGUF
from llmquant.formats.gguf.validate import check_gguf

pytestmark = [pytest.mark.slow, pytest.mark.demo]
REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is Paris, and the capital of Germany is"


@pytest.fixture(scope="module")
def llama_bin() -> Path:
    script = REPO / "scripts/build_llama_cpp.sh"
    subprocess.run(["bash", str(script)], check=True)
    return Path(subprocess.run(["bash", str(script), "--print-bin"], check=True, capture_output=True,
                               text=True).stdout.strip())


@pytest.fixture(scope="module")
def demo_files(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for mix in ("F32", "Q8_0", "Q4_K_M", "Q2_K"):
        files[mix] = root / f"demo-{mix}.gguf"
        quantize(demo_model_dir, QuantConfig(method="rtn", format="gguf", gguf_type=mix), files[mix], progress=False)
    return files


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M", "Q2_K"])
def test_llama_cpp_tokenizes_like_hf_and_generates(mix, demo_files, demo_model_dir, llama_bin):
    os.environ["LLAMA_CPP_LIB_PATH"] = str(llama_bin)
    import llama_cpp
    from transformers import AutoTokenizer

    llm = llama_cpp.Llama(str(demo_files[mix]), n_ctx=256, n_threads=2, verbose=False, seed=0)
    hf = AutoTokenizer.from_pretrained(demo_model_dir)
    for text in [PROMPT, "Numbers 12345 and  double  spaces,\nnew lines; unicode: café naïve 日本語 <|im_start|>"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text).input_ids, text
    out = llm(PROMPT, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    assert "Berlin" in out, out


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M", "Q2_K"])
def test_llama_cpp_and_our_cpu_kernels_compute_alike_on_a_quantized_file(mix, demo_files, llama_bin):
    """llmquant running the file in its blocks (nn/cpu.py: int4 kernel, two halves, 1-byte codes) is about as
    close to llama.cpp as the file decoded to float32 is (llama.cpp rounds activations for its dot products)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(llama_bin)
    import llama_cpp
    import torch

    from llmquant.api import load_any

    packed, tok = load_any(demo_files[mix])
    exact, _ = load_any(demo_files[mix], exact=True)
    ids = tok(PROMPT * 12).input_ids[:160]
    llm = llama_cpp.Llama(str(demo_files[mix]), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = {name: m(torch.tensor([ids])).logits[0].float().numpy() for name, m in
                [("packed", packed), ("exact", exact)]}
    rel = {name: np.linalg.norm(v - theirs) / np.linalg.norm(theirs) for name, v in ours.items()}
    assert rel["packed"] < 1.5 * rel["exact"] + 1e-3, rel
    assert (ours["packed"].argmax(-1) == theirs.argmax(-1)).mean() > 0.85


def assert_same_tensors(ours, theirs) -> None:
    """Every tensor of two GGUF files has the same type, shape and bytes; so has the file type."""
    a, b = check_gguf(ours), check_gguf(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    ma, mb = np.memmap(ours, dtype=np.uint8, mode="r"), np.memmap(theirs, dtype=np.uint8, mode="r")
    for name, x in ta.items():
        y = tb[name]
        assert (x.type, x.shape) == (y.type, y.shape), name
        assert np.array_equal(ma[a.data_offset + x.offset:][:x.nbytes], mb[b.data_offset + y.offset:][:y.nbytes]), name
    assert a.metadata["general.file_type"] == b.metadata["general.file_type"]


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                                 "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"])
def test_reference_encoders_match_llama_quantize_byte_for_byte(mix, demo_files, demo_model_dir, llama_bin, tmp_path):
    """Same F32 input, llama-quantize vs llmquant: every tensor has the same type and the same bytes."""
    theirs = tmp_path / "llama.gguf"
    subprocess.run([str(llama_bin / "llama-quantize"), str(demo_files["F32"]), str(theirs), mix, "2"], check=True,
                   capture_output=True)
    ours = demo_files.get(mix) or tmp_path / "ours.gguf"
    if mix not in demo_files:
        quantize(demo_model_dir, QuantConfig(method="rtn", format="gguf", gguf_type=mix), ours, progress=False)
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("family", sorted(set(FAMILY_EXTRA) - NO_GGUF))
def test_llama_cpp_computes_what_transformers_computes(family, llama_bin, tmp_path):
    """Every family we export: llama.cpp's logits on an F32 file equal the float model's (names, q/k row
    order, rope, norms, head sizes and biases all have to be right for that)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(llama_bin)
    import llama_cpp
    import torch
    from tiny import make_tiny_model, sample_text

    from llmquant.api import load_any

    src = make_tiny_model(tmp_path / "model", family, hidden=256, intermediate=512, heads=4, kv_heads=2)
    out = tmp_path / "f32.gguf"
    quantize(src, QuantConfig(method="rtn", format="gguf", gguf_type="F32"), out, progress=False)
    model, tok = load_any(src, exact=True)
    ids = tok(sample_text(40, seed=5)).input_ids[:48]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=2, verbose=False, logits_all=True,
                          type_k=0, type_v=0)  # an F32 KV cache: the default F16 one alone moves logits ~1e-3
    assert llm.tokenize(tok.decode(ids).encode(), add_bos=False) == ids
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max() + 1e-4, np.abs(got - expected).max()


@pytest.mark.parametrize("family,experts", [("mixtral", 8), ("qwen3_moe", 4), ("deepseek_v3", 4)])
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_M"])
def test_expert_files_match_llama_quantize_byte_for_byte(family, experts, mix, llama_bin, tmp_path):
    """Mixtures of experts: the same types (llama-quantize's 8-expert rules, layers read from the names of
    3D expert tensors) and the same bytes as llama-quantize makes from our F32 file."""
    from tiny import make_tiny_model

    count = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}[family]
    wide = {"q_lora_rank": 256, "kv_lora_rank": 256} if family == "deepseek_v3" else {}  # K-types on kv_b too
    src = make_tiny_model(tmp_path / "src", family, hidden=256, intermediate=512, layers=4, **{count: experts}, **wide)
    f32, theirs, ours = tmp_path / "f32.gguf", tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    quantize(src, QuantConfig(method="rtn", format="gguf", gguf_type="F32"), f32, progress=False)
    subprocess.run([str(llama_bin / "llama-quantize"), str(f32), str(theirs), mix, "2"], check=True,
                   capture_output=True)
    quantize(src, QuantConfig(method="rtn", format="gguf", gguf_type=mix), ours, progress=False)
    assert_same_tensors(ours, theirs)
