"""End-to-end generation speed: a packed W4 g128 model against its fp16 original.

    python scripts/bench_generate.py                 # Llama-3-8B shapes, random weights, needs a CUDA GPU
    python scripts/bench_generate.py --shape tiny --device cpu   # smoke run of the same path

Random weights are fine for speed. The model is built from a config in fp16, its linears are
RTN-quantized (W4 g128) and swapped for QuantLinear; both models run greedy generation from the
same prompt with a static number of new tokens. Prefill and decode tokens/s are timed separately
(CUDA-synchronised wall time over repeats; median reported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def pack(model, bits: int, group_size: int):
    """Swap every decoder linear for a QuantLinear holding its RTN-quantized weight (in place)."""
    from llmquant.nn.qlinear import QuantLinear
    from llmquant.numerics.grid import QuantSpec
    from llmquant.quant.rtn import rtn

    spec = QuantSpec(bits, group_size, sym=True)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            layer = QuantLinear.from_quantized(rtn(module.weight.data, spec)).to(module.weight.device)
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, layer)
            del module
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def timed(model, prompt: torch.Tensor, new_tokens: int, device: str, repeats: int) -> dict:
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first run warms up (autotuning, allocator)
        sync(device)
        t0 = time.perf_counter()
        model(prompt, use_cache=False)
        sync(device)
        t1 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync(device)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append((t2 - t1) - (t1 - t0))  # generate = one prefill + the decode steps
    p, d = statistics.median(prefill[1:]), statistics.median(decode[1:])
    return {"prefill_tokens_s": prompt.numel() / p, "decode_tokens_s": (new_tokens - 1) / max(d, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_generate: needs a CUDA GPU (or --shape tiny --device cpu for a smoke run)")
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = build(args.shape, args.device, dtype)
    prompt = torch.randint(0, SHAPES[args.shape]["vocab_size"], (1, args.prompt_tokens), device=args.device)
    result = {"shape": args.shape, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else "cpu", "fp16": timed(model, prompt, args.new_tokens, args.device, args.repeats)}
    pack(model, 4, 128)
    result["w4g128"] = timed(model, prompt, args.new_tokens, args.device, args.repeats)
    result["decode_speedup"] = result["w4g128"]["decode_tokens_s"] / result["fp16"]["decode_tokens_s"]
    result["prefill_speedup"] = result["w4g128"]["prefill_tokens_s"] / result["fp16"]["prefill_tokens_s"]
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
