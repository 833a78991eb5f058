"""Time the Triton gptq dequant-matmul against torch's fp16 matmul (cuBLAS) on one CUDA GPU.

For each weight shape (in -> out) and batch M: median kernel time by CUDA events over replays of a
CUDA graph (so launch gaps on the host do not count), effective GB/s (bytes the op must move / time),
TFLOP/s, speedup over x @ W^T with W in fp16, and the memory floor (those bytes / the larger of the
copy and read bandwidths measured on the device). Inputs rotate over enough copies to overflow L2, so
the weights come from device memory as they would in a model. Prints a table; writes JSON and a PNG plot.

    python scripts/bench_kernels.py                       # W4 g128 fp16, the default shapes and M
    python scripts/bench_kernels.py --bits 3 --act-order --m 1 16
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192))
BATCHES = (1, 4, 16, 64, 256, 2048)


def _kernels():
    """llmquant.kernels.gptq, or None where it cannot run (no triton)."""
    from llmquant.nn.qlinear import _load_kernels
    return _load_kernels()


def _pack():
    from llmquant.numerics.pack import pack_int32, unpack_int32
    return pack_int32, unpack_int32


def quantized_layer(K: int, N: int, bits: int, group_size: int, act_order: bool, gen: torch.Generator):
    """Random gptq tensors for a K -> N linear, packed by llmquant's writer."""
    pack_int32, _ = _pack()
    maxq = (1 << bits) - 1
    groups = 1 if group_size == -1 else math.ceil(K / group_size)
    codes = torch.randint(0, maxq + 1, (K, N), device="cuda", generator=gen)
    stored = torch.randint(0, maxq, (groups, N), device="cuda", generator=gen)
    scales = ((torch.rand(groups, N, device="cuda", generator=gen) + 0.5) * 0.01).half()
    g_idx = torch.arange(K, device="cuda") // (K if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, device="cuda", generator=gen)]
    return {"qweight": pack_int32(codes, bits, dim=0), "qzeros": pack_int32(stored, bits, dim=1), "scales": scales,
            "g_idx": g_idx.to(torch.int32)}


def dequantize(t: dict, bits: int, K: int) -> torch.Tensor:
    """W [out, in] float32, with torch: the check that the timed kernel computes the right thing."""
    _, unpack_int32 = _pack()
    N = t["qweight"].shape[1]
    q = unpack_int32(t["qweight"], bits, dim=0, n=K).float()
    zero = unpack_int32(t["qzeros"], bits, dim=1, n=N).float() + 1
    g = t["g_idx"].long()
    return ((q - zero[g]) * t["scales"].float()[g]).T.contiguous()


@functools.cache
def capture_stream() -> torch.cuda.Stream:
    """One side stream for every capture: the kernels keep a split-K workspace per stream."""
    return torch.cuda.Stream()


def time_graph(calls, replays: int) -> float:
    """Median seconds per call: `calls` (a list of closures) captured once in a CUDA graph, replayed."""
    stream = capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream: autotuning, workspaces, compilation
        for call in calls:
            call()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def memory_bandwidth(gib: float = 2.0) -> tuple[float, float]:
    """Bytes per second of a device-to-device copy (read + write) and of a sum (read only), medians of 20.

    The floor uses the larger: on an H200 the copy gave 2.7 TB/s while cuBLAS's fp16 GEMV alone read
    its weights at 4.1 TB/s, so the copy understates what a read-mostly kernel can reach."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    total = torch.empty((), dtype=torch.float32, device="cuda")
    copy = 2 * src.numel() * 4 / time_graph([lambda: dst.copy_(src)], 20)
    read = src.numel() * 4 / time_graph([lambda: torch.sum(src, dim=0, out=total)], 20)
    return copy, read


def rotations(bytes_per_set: int) -> int:
    """Copies of the inputs so that one pass over them is at least three times the L2 size."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(32, math.ceil(3 * l2 / max(bytes_per_set, 1))))


def time_gptq(kernels, layer: dict, M: int, dtype, args, gen) -> float:
    """Seconds per gptq_matmul, rotating over copies of the weights and activations."""
    K, N = layer["g_idx"].numel(), layer["qweight"].shape[1]
    sets = rotations(packed_bytes(layer, args.act_order) + (M * K + M * N) * 2)
    calls = []
    for _ in range(sets):
        copy = {k: v.clone() for k, v in layer.items()}
        x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        out = torch.empty(M, N, device="cuda", dtype=dtype)
        calls.append(functools.partial(kernels.gptq_matmul, x, copy["qweight"], copy["qzeros"], copy["scales"],
                                       copy["g_idx"] if args.act_order else None, args.bits, args.group_size, out=out))
    return time_graph(calls, args.replays)


def time_dense(weight: torch.Tensor, M: int, dtype, args, gen) -> float:
    """Seconds per torch fp16/bf16 x @ W^T (cuBLAS), rotating like time_gptq."""
    N, K = weight.shape
    sets = rotations((N * K + M * K + M * N) * 2)
    calls = [functools.partial(torch.nn.functional.linear, torch.randn(M, K, device="cuda", generator=gen).to(dtype),
                               weight.to(dtype)) for _ in range(sets)]
    return time_graph(calls, args.replays)


def packed_bytes(layer: dict, act_order: bool) -> int:
    return sum(t.numel() * t.element_size() for name, t in layer.items() if name != "g_idx" or act_order)


def bench_shape(kernels, K: int, N: int, batches, args, bandwidth: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    layer = quantized_layer(K, N, args.bits, args.group_size, args.act_order, gen)
    weight = dequantize(layer, args.bits, K)
    rows = []
    for M in batches:
        x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        y = kernels.gptq_matmul(x, layer["qweight"], layer["qzeros"], layer["scales"],
                                layer["g_idx"] if args.act_order else None, args.bits, args.group_size)
        ref = x.float() @ weight.T
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        if not rel < 1e-2:
            raise SystemExit(f"bench_kernels.py: wrong result for {K}->{N} M={M}: relative error {rel:.3g}")
        seconds = time_gptq(kernels, layer, M, dtype, args, gen)
        dense_seconds = time_dense(weight, M, dtype, args, gen)
        moved = packed_bytes(layer, args.act_order) + (M * K + M * N) * x.element_size()
        flops = 2 * M * N * K
        rows.append({"in": K, "out": N, "M": M, "us": seconds * 1e6, "torch_us": dense_seconds * 1e6,
                     "speedup": dense_seconds / seconds, "GBps": moved / seconds / 1e9, "TFLOPs": flops / seconds / 1e12,
                     "torch_TFLOPs": flops / dense_seconds / 1e12, "bytes": moved, "floor_us": moved / bandwidth * 1e6,
                     "of_floor": moved / bandwidth / seconds, "rel_err": rel})
        print(f"  {K:>6}->{N:<6} M={M:<5} {seconds * 1e6:9.1f} us  torch {dense_seconds * 1e6:9.1f} us  "
              f"x{dense_seconds / seconds:5.2f}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]):
    head = (f"{'shape':>14} {'M':>5} {'gptq us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'torch us':>9} {'speedup':>8} "
            f"{'floor us':>9} {'floor/t':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['in']:>6}->{r['out']:<7} {r['M']:>5} {r['us']:9.1f} {r['GBps']:7.0f} {r['TFLOPs']:8.1f} "
              f"{r['torch_us']:9.1f} {r['speedup']:8.2f} {r['floor_us']:9.1f} {r['of_floor']:8.2f}")


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for shape in dict.fromkeys((r["in"], r["out"]) for r in rows):
        mine = [r for r in rows if (r["in"], r["out"]) == shape]
        label = f"{shape[0]}->{shape[1]}"
        left.plot([r["M"] for r in mine], [r["speedup"] for r in mine], marker="o", label=label)
        right.plot([r["M"] for r in mine], [r["of_floor"] for r in mine], marker="o", label=label)
    for ax, ylabel in ((left, "speedup over torch fp16 matmul"), (right, "memory floor / time")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    left.axhline(1.0, color="gray", lw=0.8)
    right.set_ylim(0, 1.05)
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true", help="permuted g_idx (desc_act)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--m", type=int, nargs="+", default=list(BATCHES), help="batch sizes (tokens)")
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="IN x OUT, e.g. 4096x14336")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_kernels")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py: needs a CUDA GPU, and torch sees none on this machine")
    kernels = _kernels()
    if kernels is None:
        raise SystemExit("bench_kernels.py: the Triton kernels cannot run here (is triton installed?)")

    device = torch.cuda.get_device_name(0)
    copy, read = memory_bandwidth()
    bandwidth = max(copy, read)
    print(f"{device}: device-to-device copy {copy / 1e9:.0f} GB/s (read + write), sum {read / 1e9:.0f} GB/s (read)",
          file=sys.stderr)
    rows = []
    for shape in args.shapes:
        K, N = (int(v) for v in shape.lower().split("x"))
        rows += bench_shape(kernels, K, N, args.m, args, bandwidth)

    title = (f"W{args.bits} g{args.group_size}{' act-order' if args.act_order else ''} {args.dtype}, {device}")
    print(title)
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"w{args.bits}g{args.group_size}{'_act' if args.act_order else ''}_{args.dtype}"
    report = {"device": device, "copy_GBps": copy / 1e9, "read_GBps": read / 1e9, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                      for k, v in vars(args).items()},
              "rows": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    png = args.out / f"{stem}.png"
    print(f"wrote {args.out / f'{stem}.json'}" + (f" and {png}" if plot(rows, png, title) else
                                                    " (no plot: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
