"""Write a Llama-shaped Hugging Face checkpoint with random weights, for memory and speed benchmarks.

The models that quantizer benchmarks need (1B to 13B parameters) cannot come from the Hub here. For measuring
memory and time, their values do not matter, only their shapes. This script writes such a checkpoint:
a real `LlamaConfig`, sharded safetensors with `model.safetensors.index.json`, and the demo model's tokenizer
(whose 49152-token vocab matches). It writes one tensor at a time, 16 MiB at a time, so every shape needs
about 0.6 GB of RAM (peak RSS), the 13B one included. The same seed gives the same weights.

    python scripts/make_random_model.py /tmp/rand-1b --shape 1b                # 1.2B params, 2.3 GB, ~20 s
    python scripts/make_random_model.py /tmp/rand-1b-44 --shape 1b --layers 44 # the 1b shape twice as deep
    python scripts/make_random_model.py /tmp/rand-8b --shape 8b                # Llama-3-8B's blocks, 7.0B params
    python scripts/make_random_model.py /tmp/rand-13b --shape 13b              # 13.2B params, 26 GB, ~3 min

`--shape tiny` writes a 2-layer model in a few seconds, to try the script or a pipeline out. `--experts N`
writes the shape as a Mixtral-style mixture of N experts (top 2) of the same total size: each expert's MLP is
1/N of the dense one, so dense and MoE benchmarks compare time per parameter.

    python scripts/make_random_model.py /tmp/rand-1b-moe --shape 1b --experts 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40),
}
VOCAB_SIZE = 49152
# torch dtype and its safetensors name
DTYPES = {"bf16": (torch.bfloat16, "BF16"), "fp16": (torch.float16, "F16"), "fp32": (torch.float32, "F32")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "generation_config.json")
STD = 0.02  # of every matrix, like transformers' initializer_range
CHUNK_ELEMENTS = 1 << 22  # float32 elements generated at once: 16 MiB, so the largest tensor never is in RAM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="checkpoint directory to create")
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--layers", type=int, help="number of decoder layers (default: the shape's)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB, 1GiB (default 2GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experts", type=int, default=0,
                        help="a Mixtral-style MoE of this many experts of the same total size (default: dense)")
    parser.add_argument("--tie", action="store_true", help="tie lm_head to the embedding (no lm_head.weight)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--tokenizer", type=Path,
                        help="a directory with a tokenizer of at most 49152 tokens (default: the demo model's)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to replace it")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.experts == 1 or args.experts < 0 or (args.experts and SHAPES[args.shape]["intermediate_size"] % args.experts):
        parser.error("--experts must be 0 or at least 2, and divide the shape's intermediate size")
    return args


def demo_tokenizer(path: Path | None = None):
    """(directory, tokenizer): `path`'s, or the demo model's, the only real Llama-family tokenizer offline."""
    from transformers import AutoTokenizer

    if path is None:
        from llmquant.models.demo import demo_model_path

        path = demo_model_path()
    return path, AutoTokenizer.from_pretrained(path)


def build_config(args: argparse.Namespace, tokenizer):
    """The LlamaConfig (MixtralConfig with --experts) of the requested shape, with the demo tokenizer's special
    token ids."""
    from transformers import LlamaConfig, MixtralConfig

    if len(tokenizer) > VOCAB_SIZE:
        raise SystemExit(f"the demo tokenizer has {len(tokenizer)} tokens, more than the vocab {VOCAB_SIZE}")
    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=args.tie,
                  dtype=DTYPES[args.dtype][0], bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.experts:
        shape["intermediate_size"] //= args.experts
        return MixtralConfig(**shape, **common, num_local_experts=args.experts, num_experts_per_tok=2,
                             architectures=["MixtralForCausalLM"])
    return LlamaConfig(**shape, **common, architectures=["LlamaForCausalLM"])


def tensor_plan(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape [out, in]) of every stored tensor, in file order, as the checkpoints of LlamaForCausalLM
    (or Mixtral's, expert by expert) name them."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    mlp = [("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)), ("mlp.down_proj", (hidden, inter))]
    experts = getattr(config, "num_local_experts", 0)
    if experts:
        mlp = [("block_sparse_moe.gate", (experts, hidden))] + [
            (f"block_sparse_moe.experts.{e}.{leaf}", shape) for e in range(experts)
            for leaf, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter)))]
    layer = [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
             ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)), *mlp,
             ("input_layernorm", (hidden,)), ("post_attention_layernorm", (hidden,))]
    plan = [("model.embed_tokens.weight", (config.vocab_size, hidden))]
    for i in range(config.num_hidden_layers):
        plan += [(f"model.layers.{i}.{name}.weight", shape) for name, shape in layer]
    plan.append(("model.norm.weight", (hidden,)))
    if not config.tie_word_embeddings:
        plan.append(("lm_head.weight", (config.vocab_size, hidden)))
    return plan


def check_against_transformers(config, plan: list[tuple[str, tuple[int, ...]]]) -> None:
    """Fail before writing anything if transformers would name or shape a tensor differently (costs no memory:
    the model is built on the meta device)."""
    from transformers import AutoModelForCausalLM

    from llmquant.models.adapters import adapter_for

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(config.model_type, model)  # MoE: the experts as their checkpoints name them
    expected = {adapter.to_disk(name): tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]  # the same tensor as the embedding: not stored
    if expected != dict(plan):
        diff = sorted(set(expected.items()) ^ set(plan))
        raise SystemExit(f"tensor names/shapes disagree with transformers' {type(model).__name__}: {diff[:6]}")


def plan_shards(plan, itemsize: int, limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards in order, a new shard whenever the next tensor would pass `limit` bytes
    (a tensor larger than `limit` gets a shard of its own). Planned from shapes, so the shard count is known
    before the first file is named."""
    shards, size = [[]], 0
    for name, shape in plan:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def shard_header(tensors, dtype_name: str, itemsize: int) -> bytes:
    """The safetensors header of a shard: u64 little-endian length, then JSON padded with spaces to 8 bytes.
    Written by hand because safetensors' save_file needs every tensor of the shard in memory at once."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor(f, name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
    """Append one tensor's bytes: norms (1-D) are ones, matrices normal(0, STD) drawn in float32, a block of
    rows at a time, from a generator seeded by (seed, name), so values depend neither on the dtype nor on the
    sharding."""
    if len(shape) == 1:
        f.write(torch.ones(shape, dtype=dtype).view(torch.uint8).numpy())
        return
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))  # torch's CPU RNG keeps 32 bits
    rows, cols = shape
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        block = torch.empty(min(step, rows - start), cols).normal_(0.0, STD, generator=gen)
        f.write(block.to(dtype).view(torch.uint8).numpy())


def write_shard(path: Path, tensors, args: argparse.Namespace, bar: tqdm) -> None:
    """Write one shard, tensor by tensor, then reopen it with safetensors to prove the hand-written header."""
    from safetensors import safe_open

    dtype, dtype_name = DTYPES[args.dtype]
    itemsize = dtype.itemsize
    with open(path, "wb") as f:
        f.write(shard_header(tensors, dtype_name, itemsize))
        for name, shape in tensors:
            write_tensor(f, name, shape, dtype, args.seed)
            bar.update()
    with safe_open(path, "pt") as handle:
        if set(handle.keys()) != {name for name, _ in tensors}:
            raise SystemExit(f"{path}: safetensors reads back other tensors than were written")


def write_weights(dest: Path, shards, args: argparse.Namespace) -> None:
    """Every shard, then model.safetensors.index.json mapping each tensor to its shard."""
    itemsize = DTYPES[args.dtype][0].itemsize
    weight_map, total = {}, 0
    with tqdm(total=sum(map(len, shards)), unit="tensor", desc="writing") as bar:
        for i, tensors in enumerate(shards, 1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            bar.set_postfix_str(filename)
            write_shard(dest / filename, tensors, args, bar)
            weight_map.update({name: filename for name, _ in tensors})
            total += sum(math.prod(shape) for _, shape in tensors) * itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(src: Path, dest: Path) -> None:
    """The demo model's tokenizer and generation config, whichever of the usual files it has."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)


def publish(tmp: Path, out: Path) -> None:
    """Move the finished checkpoint into place, replacing OUT (only there when --force allowed it)."""
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    from transformers.utils.hub import convert_file_size_to_int

    tokenizer_dir, tokenizer = demo_tokenizer(args.tokenizer)
    config = build_config(args, tokenizer)
    plan = tensor_plan(config)
    check_against_transformers(config, plan)
    shards = plan_shards(plan, DTYPES[args.dtype][0].itemsize, convert_file_size_to_int(args.shard_size))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))  # a sibling: rename is atomic
    tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        config.save_pretrained(tmp)
        copy_tokenizer(tokenizer_dir, tmp)
        write_weights(tmp, shards, args)
        publish(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(math.prod(shape) for _, shape in plan)
    on_disk = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(f"{args.out}: {params / 1e9:.3f}B params ({args.shape}{f' x{args.experts} experts' * bool(args.experts)}, "
          f"{config.num_hidden_layers} layers, "
          f"{args.dtype}), {on_disk / 1e9:.2f} GB in {len(shards)} shards, {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
