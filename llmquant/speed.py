"""Inference speed and memory of a model, and of its base beside it: `llmquant bench`.

Each model is measured in a child process of its own, so its memory is its own: the resident
memory once loaded, and the peak over loading and running. Inside the child, `generate()` runs as
`llmquant generate` runs it: a warm-up (short; of the full lengths when compiled, since compilation
is for one shape), then a prefill of `prompt_tokens` random token ids (time to first token: the
prompt's forward and the first token's choice) and greedy decoding of exactly `new_tokens` tokens
through the KV cache. Token ids are drawn from a fixed seed, so a model and its base see the same
prompt. With `compiled`, the KV cache is static and the decode step is compiled (torch.compile).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .errors import UserError

FLOAT_DTYPES = ("bfloat16", "float32")


@dataclass
class Speed:
    path: str
    dtype: str  # what the float parameters and activations are held in ("packed" layers aside)
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_s: float
    load_s: float
    warmup_s: float  # the first generation, compilation included
    compiled: bool
    rss_loaded_bytes: int
    peak_rss_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: str, prompt_tokens: int, new_tokens: int, device: str = "cpu", dtype: str | None = None,
            compiled: bool = False) -> Speed:
    """One model's figures, in this process (see the module docstring)."""
    import torch

    from .api import load_any

    start = time.perf_counter()
    model, _ = load_any(path, device, exact=dtype == "float32")
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    load_s = time.perf_counter() - start
    rss_loaded = _rss_bytes()  # lengths against the context were checked by bench(), before loading
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    if compiled:  # warm-up: allocations, lazy initialisation, compilation
        _generate(model, ids, new_tokens, compiled)
    else:
        _generate(model, ids[:, :8], 4, compiled)
    warmup_s = time.perf_counter() - start
    clock = _generate(model, ids, new_tokens, compiled)
    held = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return Speed(str(path), str(held).removeprefix("torch."), prompt_tokens, new_tokens,
                 clock.prefill_rate(prompt_tokens), clock.decode_rate(new_tokens), clock.first - clock.start,
                 load_s, warmup_s, compiled, rss_loaded, _peak_rss_bytes())


def _generate(model, ids, new_tokens: int, compiled: bool) -> "Clock":
    """Greedy generation of exactly `new_tokens` tokens through `generate()`, as `llmquant generate` runs it."""
    import torch

    clock = Clock()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0,
                       **generation_options(compiled))
    if ids.is_cuda:
        torch.cuda.synchronize()
    return clock


def generation_options(compiled: bool) -> dict:
    """generate() options: with `compiled`, a static KV cache and the decode step compiled by torch.compile
    (transformers does that on its own on CUDA; here it is asked for on every device)."""
    if not compiled:
        return {"disable_compile": True}
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True  # transformers' switch for compiling off CUDA
    return {"cache_implementation": "static", "compile_config": config}


class _Timing:
    """Times a generate() call through its streamer: it puts the prompt first, then each new token."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = time.perf_counter()
        self.first = self.last = None
        self.puts = 0

    def tick(self) -> None:
        now = time.perf_counter()
        self.puts += 1
        if self.puts == 2:
            self.first = now
        if self.puts >= 2:
            self.last = now

    def prefill_rate(self, prompt_tokens: int) -> float:
        """Prompt tokens per second up to the first new token (time to first token)."""
        return prompt_tokens / max(1e-9, (self.first or time.perf_counter()) - self.start)

    def decode_rate(self, new_tokens: int) -> float:
        """New tokens per second after the first."""
        if self.first is None or self.last is None or new_tokens < 2:
            return float("nan")
        return (new_tokens - 1) / max(1e-9, self.last - self.first)


def _streamers():
    from transformers import TextStreamer
    from transformers.generation.streamers import BaseStreamer

    class Clock(_Timing, BaseStreamer):
        """Times generation, prints nothing."""

        def put(self, value):
            self.tick()

        def end(self):
            pass

    class TimedStreamer(_Timing, TextStreamer):
        """Streams text like TextStreamer and times it."""

        def put(self, value):
            self.tick()
            super().put(value)

    return Clock, TimedStreamer


Clock, TimedStreamer = _streamers()


def measure_in_child(path: str, prompt_tokens: int, new_tokens: int, device: str = "cpu",
                     dtype: str | None = None, compiled: bool = False) -> Speed:
    """`measure` in a fresh interpreter, so that memory figures are this model's alone."""
    args = json.dumps({"path": str(path), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                       "device": device, "dtype": dtype, "compiled": compiled})
    proc = subprocess.run([sys.executable, "-m", "llmquant.speed", args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        if lines[-1].startswith("llmquant: error: "):  # the child's one line for a user's mistake
            raise UserError(lines[-1].removeprefix("llmquant: error: "))
        raise RuntimeError(f"measuring {path} failed:\n{proc.stderr}")
    return Speed(**json.loads(proc.stdout.strip().splitlines()[-1]))


def model_facts(path: str) -> tuple[int | None, int | None]:
    """(vocabulary size, context length) from a checkpoint's config.json or a GGUF file's metadata, without
    loading weights; a path that is neither is a UserError."""
    from pathlib import Path

    from .formats.gguf.reader import is_gguf
    from .models.loader import read_config, resolve_model

    if is_gguf(path):
        from .formats.gguf.validate import array_length, check_gguf

        meta = check_gguf(path).metadata
        arch = meta.get("general.architecture")
        return array_length(meta.get("tokenizer.ggml.tokens")), meta.get(f"{arch}.context_length")
    config = read_config(Path(resolve_model(path)))
    text = config.get("text_config", config)
    return text.get("vocab_size"), text.get("max_position_embeddings")


def check_lengths(prompt_tokens: int, new_tokens: int) -> None:
    if prompt_tokens < 1 or new_tokens < 2:
        raise UserError(f"need --prompt-tokens >= 1 and --new-tokens >= 2, not {prompt_tokens} and {new_tokens}")


def bench(path: str, base: str | None = None, prompt_tokens: int = 256, new_tokens: int = 32, device: str = "cpu",
          base_dtypes: tuple[str, ...] | None = None, compiled: bool = False) -> dict:
    """Figures of `path` and, with `base`, of the base in each of `base_dtypes` (default on the CPU: bfloat16
    and float32, since which is faster differs between prefill and decode), one after the other, each in
    its own process; the ratios compare against the base's faster figure."""
    check_lengths(prompt_tokens, new_tokens)
    vocab, context = model_facts(path)
    for name, (v, c) in [(path, (vocab, context)), *([(base, model_facts(base))] if base else [])]:
        if c and prompt_tokens + new_tokens > c:
            raise UserError(f"{name}: a prompt of {prompt_tokens} tokens and {new_tokens} new ones exceed its "
                            f"context of {c} tokens")
        if v and vocab and v != vocab:
            raise UserError(f"{base} has a vocabulary of {v} tokens and {path} one of {vocab}: "
                            f"a base must share the model's tokenizer")
    result = {"model": measure_in_child(path, prompt_tokens, new_tokens, device, None, compiled).to_dict(), "base": [],
              "device": device_name(device)}
    if base is None:
        return result
    dtypes = base_dtypes or (FLOAT_DTYPES if device == "cpu" else (None,))
    result["base"] = [measure_in_child(base, prompt_tokens, new_tokens, device, d, compiled).to_dict()
                      for d in dtypes]
    best = {key: max(b[key] for b in result["base"]) for key in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    result["decode_speedup"] = result["model"]["decode_tokens_per_s"] / best["decode_tokens_per_s"]
    result["prefill_speedup"] = result["model"]["prefill_tokens_per_s"] / best["prefill_tokens_per_s"]
    result["memory_ratio"] = result["model"]["rss_loaded_bytes"] / min(b["rss_loaded_bytes"] for b in result["base"])
    return result


def device_name(device: str) -> str:
    """The processor figures were measured on (speeds differ between CPUs far more than between runs)."""
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    names = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"


def _child(argv: list[str]) -> int:
    from .errors import one_line

    try:
        print(json.dumps(measure(**json.loads(argv[0])).to_dict()))
    except Exception as err:
        line = one_line(err)
        if line is None:
            raise
        print(f"llmquant: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
