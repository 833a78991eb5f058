"""Triton dequant-matmul for the gptq packed layout (v1 and v2): y = x @ W^T with W rebuilt in registers.

Layout (see REFERENCE.md): qweight int32 [ceil(in*bits/32), out], a little-endian bit stream along
the input dimension (3-bit: 32 inputs fill 3 words, two of them straddle words); qzeros int32
[groups, ceil(out*bits/32)], the same stream along the output dimension, each field holding
zero - 1 (v1) or the zero itself (gptq_v2); scales [groups, out]; g_idx int32 [in]. W[o, i] = (q[i, o] - zero[g, o]) * scale[g, o]
with g = g_idx[i]. Weights are read once, packed.

Kernels. `_gemv_kernel` (M == 1) multiplies and adds in fp32 on the CUDA cores; each thread owns
whole words of a few output columns, so the sum over a K tile stays inside the thread, and when the
tile lies in one group the scale is applied once per tile and column instead of once per weight.
`_gemm_kernel` (M > 1) dequantizes a [BLOCK_K, BLOCK_N] tile to x's dtype for the tensor cores;
with BLOCK_M = 16 it is the skinny (decode-batch) kernel. Both split K across programs when the
output alone has too few tiles to fill the GPU: the last program to finish a tile (an arrival
counter per tile) reads the fp32 partial sums back, writes y and zeroes its workspace and counter,
so no memset or cast kernel runs around the launch.

Codes become floats without an int -> float conversion: a code masked where it lies (bit p of its
word) and OR-ed into the bits of 2^23 reads as fp32 2^23 + q * 2^p; subtracting 2^23 + zero * 2^p
leaves (q - zero) * 2^p exactly, and the 2^-p goes into the scale.

Measured only through the interpreter and sm_90 compiles (registers, spills, instructions per
weight); the config lists are untimed candidates for the autotuner.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import triton
import triton.language as tl

# Triton decides between compiling and interpreting when @triton.jit runs, i.e. on import.
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_BITS = (2, 3, 4, 8)
_WHOLE_INPUT = 1 << 30  # GROUP_SIZE for per-channel: one group that no K tile can leave
# Bits of 2^23 in fp32: OR-ing a small integer into its mantissa adds the integer. The kernels get it
# as a run-time argument: as a compile-time constant the compiler rewrites (w | m) & (mask | m) into
# (w & mask) | m, which needs two constants per code and reloads them on every iteration.
_MAGIC = 0x4B000000


@triton.jit
def _field(lo, hi, off, BITS: tl.constexpr):
    """The BITS-bit field starting at bit `off` of the 64-bit word (hi:lo)."""
    MAXQ: tl.constexpr = (1 << BITS) - 1
    if BITS == 3:
        straddle = off + BITS > 32
        up = (32 - off) & 31  # bits of the field that lie in lo; & 31 keeps the shift defined
        low = (lo >> off) & tl.where(straddle, (1 << up) - 1, MAXQ)
        return low | tl.where(straddle, (hi << up) & MAXQ, 0)
    else:
        return (lo >> off) & MAXQ


@triton.jit
def _tile_inputs(k0, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Input indices of a K tile as [BLOCK_K // VPG, VPG, 1]: input k0 + VPG*a + b at [a, b], with VPG the
    values per packed word (32 per 3 words for 3 bits). Every tile is handled in this shape so that
    the codes of one word stay in one thread."""
    VPG: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    return k0 + (tl.arange(0, BLOCK_K // VPG)[:, None] * VPG + tl.arange(0, VPG)[None, :])[:, :, None]


@triton.jit
def _unpack(qweight_ptr, stride_q, q_rows, k0, offs_n, mask_n, magic, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The codes of a K tile as floats f = 2^23 + q * 2^p, shaped like _tile_inputs x BLOCK_N, and the
    exponents p [1, VPG, 1].

    A field is masked where it lies and OR-ed into the mantissa of 2^23 (one logic op per code);
    fields that would reach the exponent are first shifted down together (one shift per word).
    f - (2^23 + zero * 2^p) is then (q - zero) * 2^p exactly."""
    n = offs_n[None, :]
    mask = mask_n[None, :]
    if BITS == 3:
        rows = (k0 // 32 + tl.arange(0, BLOCK_K // 32))[:, None] * 3
        w0 = tl.load(qweight_ptr + rows * stride_q + n, mask=mask & (rows < q_rows), other=0)[:, None, :]
        w1 = tl.load(qweight_ptr + (rows + 1) * stride_q + n, mask=mask & (rows + 1 < q_rows), other=0)[:, None, :]
        w2 = tl.load(qweight_ptr + (rows + 2) * stride_q + n, mask=mask & (rows + 2 < q_rows), other=0)[:, None, :]
        start = tl.arange(0, 32) * 3
        word = (start >> 5)[None, :, None]
        lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
        hi = tl.where(word == 0, w1, w2)
        q = _field(lo, hi, (start & 31)[None, :, None], 3)
        return (q | magic).to(tl.float32, bitcast=True), tl.zeros((1, 32, 1), tl.int32)
    else:
        VPG: tl.constexpr = 32 // BITS
        MAXQ: tl.constexpr = (1 << BITS) - 1
        DOWN: tl.constexpr = 16 if BITS == 8 else 12  # brings the high fields under bit 23 - BITS
        rows = (k0 // VPG + tl.arange(0, BLOCK_K // VPG))[:, None]
        words = tl.load(qweight_ptr + rows * stride_q + n, mask=mask & (rows < q_rows), other=0)[:, None, :]
        start = (tl.arange(0, VPG) * BITS)[None, :, None]
        shift = tl.where(start > 23 - BITS, DOWN, 0)
        p = start - shift
        return (((words >> shift) | magic) & ((MAXQ << p) | magic)).to(tl.float32, bitcast=True), p


@triton.jit
def _scale_zero(scales_ptr, qzeros_ptr, g_idx_ptr, stride_s, stride_z, k0, offs_k, mask_k, offs_n, mask_n,
                BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ONE_GROUP: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """Scale (fp32) and zero point (int32) for inputs offs_k and outputs offs_n, broadcast together.

    GROUP_SIZE > 0: groups are contiguous runs of that many inputs, and with ONE_GROUP (no K tile
    leaves its group) one row serves the whole tile. GROUP_SIZE == 0: act-order, the group of
    every input comes from g_idx."""
    if ONE_GROUP:
        g = k0 // GROUP_SIZE
        mask = mask_n
    elif GROUP_SIZE > 0:
        g = offs_k // GROUP_SIZE
        mask = mask_k & mask_n
    else:
        g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        mask = mask_k & mask_n
    scale = tl.load(scales_ptr + g * stride_s + offs_n, mask=mask, other=0).to(tl.float32)
    zero_row = qzeros_ptr + g * stride_z
    start = offs_n * BITS
    lo = tl.load(zero_row + (start >> 5), mask=mask, other=0)
    if BITS == 3:
        hi = tl.load(zero_row + (start >> 5) + 1, mask=mask & ((start & 31) + BITS > 32), other=0)
    else:
        hi = lo
    return scale, _field(lo, hi, start & 31, BITS) + ZERO_OFFSET  # v1 stores zero - 1, v2 the zero


@triton.jit
def _dequant_parts(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, stride_q, stride_z, stride_s, q_rows, k0, offs_k,
                   K, offs_n, mask_n, magic, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                   ZERO_OFFSET: tl.constexpr):
    """A K tile of W as the product of d = (q - zero) * 2^p (exact), unit = 2^-p and scale, each
    broadcastable to [BLOCK_K // VPG, VPG, BLOCK_N]; offs_k from _tile_inputs."""
    ONE_GROUP: tl.constexpr = GROUP_SIZE > 0 and GROUP_SIZE % BLOCK_K == 0
    f, p = _unpack(qweight_ptr, stride_q, q_rows, k0, offs_n, mask_n, magic, BITS, BLOCK_K)
    scale, zero = _scale_zero(scales_ptr, qzeros_ptr, g_idx_ptr, stride_s, stride_z, k0, offs_k, offs_k < K,
                              offs_n[None, None, :], mask_n[None, None, :], BITS, GROUP_SIZE, ONE_GROUP, ZERO_OFFSET)
    d = f - ((zero << p) | magic).to(tl.float32, bitcast=True)
    unit = ((127 - p) << 23).to(tl.float32, bitcast=True)
    return d, unit, scale


@triton.jit
def _k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K tiles [first, last) of this program's split."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = tl.program_id(1) * per_split
    return first, tl.minimum(first + per_split, k_tiles)


@triton.jit
def _write(acc, y_ptr, ws_ptr, counter_ptr, tile, offs_m, offs_n, mask, N, stride_y, SPLIT_K: tl.constexpr):
    """Store a tile of y; under split-K, add to the workspace and let the last arrival store."""
    y_ptrs = y_ptr + offs_m * stride_y + offs_n
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_m * N + offs_n
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums land before the arrival is counted
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # exchange through int32: reads the sums at L2 and leaves the workspace zero for the next call
            bits = tl.atomic_xchg(ws_ptrs.to(tl.pointer_type(tl.int32)), tl.zeros(acc.shape, tl.int32),
                                  mask=mask, sem="relaxed")
            total = tl.where(mask, bits, 0).to(tl.float32, bitcast=True)  # masked lanes hold no sum
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed")


@triton.jit
def _gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr, ws_ptr, counter_ptr,
                 M, N, K, q_rows, stride_x, stride_q, stride_z, stride_s, stride_y, M_BUCKET, magic,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # Tiles stay 3-D throughout (no reshape) and x is loaded first: either change lets the compiler
    # pick a layout that moves whole weight tiles through shared memory and spills.
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((1, 1, BLOCK_N), dtype=tl.float32)
    first, last = _k_range(K, BLOCK_K, SPLIT_K)
    for t in range(first, last):
        k0 = t * BLOCK_K
        offs_k = _tile_inputs(k0, BITS, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0).to(tl.float32)
        d, unit, scale = _dequant_parts(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, stride_q, stride_z, stride_s,
                                        q_rows, k0, offs_k, K, offs_n, mask_n, magic, BITS, GROUP_SIZE, BLOCK_K,
                                        ZERO_OFFSET)
        if GROUP_SIZE > 0 and GROUP_SIZE % BLOCK_K == 0:  # unit varies by slot only, scale by column only
            acc += tl.sum(tl.sum(d * x, axis=0, keep_dims=True) * unit, axis=1, keep_dims=True) * scale
        else:
            acc += tl.sum(tl.sum(d * scale * (x * unit), axis=1, keep_dims=True), axis=0, keep_dims=True)
    _write(acc, y_ptr, ws_ptr, counter_ptr, pid_n, 0, offs_n[None, None, :], mask_n[None, None, :], N, stride_y,
           SPLIT_K)


@triton.jit
def _gemm_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr, ws_ptr, counter_ptr,
                 M, N, K, q_rows, stride_x, stride_q, stride_z, stride_s, stride_y, M_BUCKET, magic,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ZERO_OFFSET: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    # tiles in bands of GROUP_M rows of blocks, so programs running together share weight tiles in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * grid_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first, last = _k_range(K, BLOCK_K, SPLIT_K)
    for t in range(first, last):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(x_ptr + offs_m * stride_x + offs_k, mask=mask_m & (offs_k < K), other=0)
        d, unit, scale = _dequant_parts(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, stride_q, stride_z, stride_s,
                                        q_rows, k0, _tile_inputs(k0, BITS, BLOCK_K), K, offs_n, mask_n, magic, BITS,
                                        GROUP_SIZE, BLOCK_K, ZERO_OFFSET)
        w = tl.reshape(d * (unit * scale), (BLOCK_K, BLOCK_N)).to(x.dtype)
        if DOT_F32:  # the interpreter multiplies bf16 bit patterns as integers; the operands stay bf16-rounded
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w, acc)
    _write(acc, y_ptr, ws_ptr, counter_ptr, pid_m * grid_n + pid_n, offs_m, offs_n[None, :],
           mask_m & mask_n[None, :], N, stride_y, SPLIT_K)


# ---------------------------------------------------------------------------------------------
# Launch configurations. Each regime tunes once per (M bucket, N, K, bits, group mode, dtype);
# under the interpreter there is a single small config per regime.

def _cdiv(a: int, b: int) -> int:
    """Ceiling division on the host: in recent Triton (3.9) triton.cdiv is a constexpr function, and
    each call through its wrapper costs microseconds on a path that runs for every launch."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(args: dict) -> int:
    """Split K until about two waves of programs run, keeping at least two K tiles per program."""
    x = args["x_ptr"]
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else 8
    tiles = _cdiv(args["M"], args.get("BLOCK_M", 1)) * _cdiv(args["N"], args["BLOCK_N"])
    k_tiles = _cdiv(args["K"], args["BLOCK_K"])
    wanted = max(1, min(_cdiv(2 * sms, tiles), k_tiles // 2))
    return _cdiv(k_tiles, _cdiv(k_tiles, wanted))  # no split left without tiles


def _cfg(num_warps, num_stages, **kwargs):
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# GPU lists: candidates compiled for sm_90 (ptxas, no GPU) and kept where the contiguous-group path
# needs no local memory; the first of each list also for every bit width (see the compile test).
# Untimed: the autotuner picks among them on the device.
if INTERPRETED:
    _GEMV_CONFIGS = [_cfg(4, 1, BLOCK_N=32, BLOCK_K=64)]
    _SKINNY_CONFIGS = [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=8)]
    _MID_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=8)]
    _LARGE_CONFIGS = [_cfg(4, 1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, SPLIT_K=1)]
else:
    _GEMV_CONFIGS = [  # BLOCK_K 32 keeps 32-input groups on the one-group-per-tile path
        _cfg(2, 3, BLOCK_N=256, BLOCK_K=64),
        _cfg(1, 3, BLOCK_N=128, BLOCK_K=64),
        _cfg(4, 3, BLOCK_N=512, BLOCK_K=64),
        _cfg(2, 3, BLOCK_N=256, BLOCK_K=32),
        _cfg(4, 3, BLOCK_N=512, BLOCK_K=32),
    ]
    _SKINNY_CONFIGS = [
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=256, BLOCK_K=32, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    ]
    _MID_CONFIGS = [
        _cfg(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    ]
    _LARGE_CONFIGS = [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SPLIT_K=1),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SPLIT_K=1),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, SPLIT_K=1),
        _cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, SPLIT_K=1),
    ]

_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"]  # the autotuner adds the tensors' dtypes


def _tuned(kernel, configs, split: bool):
    inner = triton.heuristics({"SPLIT_K": _split_k})(kernel) if split else kernel
    return triton.autotune(configs=configs, key=_KEY)(inner)


# (largest M, launcher, splits K): the first regime whose bound admits M runs
_REGIMES = (
    (1, _tuned(_gemv_kernel, _GEMV_CONFIGS, split=True), True),
    (16, _tuned(_gemm_kernel, _SKINNY_CONFIGS, split=True), True),
    (256, _tuned(_gemm_kernel, _MID_CONFIGS, split=True), True),
    (None, _tuned(_gemm_kernel, _LARGE_CONFIGS, split=False), False),
)
_SMALLEST_BLOCK = 16  # no config has BLOCK_M or BLOCK_N below this: bounds the arrival counters


# ---------------------------------------------------------------------------------------------
# Host side.

_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 partial sums and int32 arrival counters, one pair per (device, stream).

    The kernels leave both zero after every launch, so they are allocated once and reused; a
    launch that needs more replaces them with larger zeroed ones."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, cnt = _workspaces.get(key, (None, None))
    if ws is None or ws.numel() < floats:
        ws = torch.zeros(max(floats, 1), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < counters:
        cnt = torch.zeros(max(counters, 1), dtype=torch.int32, device=device)
    _workspaces[key] = (ws, cnt)
    return ws, cnt


_contiguity: dict[int, tuple[weakref.ref, int, int, bool]] = {}


def groups_are_contiguous(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether g_idx[i] == i // group_size (no act-order permutation), checked once per tensor.

    The check reads the device (a sync), so its answer is remembered for this tensor object until
    it is modified in place or freed."""
    entry = _contiguity.get(id(g_idx))
    if entry is not None and entry[0]() is g_idx and entry[1:3] == (g_idx._version, group_size):
        return entry[3]
    width = g_idx.numel() if group_size == -1 else group_size
    default = torch.arange(g_idx.numel(), device=g_idx.device) // max(width, 1)
    answer = bool(torch.equal(g_idx.to(torch.int64), default))
    key = id(g_idx)
    _contiguity[key] = (weakref.ref(g_idx, lambda _, key=key: _contiguity.pop(key, None)),
                        g_idx._version, group_size, answer)
    return answer


def _check(x, qweight, qzeros, scales, g_idx, bits, group_size) -> tuple[int, int, int]:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group size must be positive or -1 (per channel), got {group_size}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"activations must be float16 or bfloat16, got {x.dtype}")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    K = x.shape[-1]
    N = qweight.shape[1]
    groups = scales.shape[0]
    expected = {
        "qweight": (qweight.shape, (_cdiv(K * bits, 32), N)),
        "scales": (scales.shape, (groups, N)),
        "qzeros": (qzeros.shape, (groups, _cdiv(N * bits, 32))),
    }
    if g_idx is not None:
        expected["g_idx"] = (g_idx.shape, (K,))
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(f"{name} has shape {tuple(got)}, expected {want} for in={K}, out={N}, bits={bits}")
    if g_idx is None and groups != (1 if group_size == -1 else _cdiv(K, group_size)):
        raise ValueError(f"{groups} groups of scales do not fit in={K} with group size {group_size}")
    devices = {t.device for t in (x, qweight, qzeros, scales) + ((g_idx,) if g_idx is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return x.numel() // K if K else 0, N, K


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int,
                out: torch.Tensor | None = None, zero_offset: int = 1) -> torch.Tensor:
    """y [..., out] = x [..., in] @ W^T for a gptq-packed W, in x's dtype (float16 or bfloat16).

    g_idx None means contiguous groups (i // group_size); group_size -1 means one group per
    output channel. `out`, if given, is a contiguous [..., out] tensor of x's dtype to write. qzeros hold
    zero - zero_offset: 1 for gptq (v1) checkpoints, 0 for gptq_v2."""
    M, N, K = _check(x, qweight, qzeros, scales, g_idx, bits, group_size)
    if zero_offset not in (0, 1):
        raise ValueError(f"zero_offset must be 1 (gptq v1) or 0 (gptq_v2), got {zero_offset}")
    lead = x.shape[:-1]
    if out is None:
        out = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, N) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, N)}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    qweight, qzeros, scales = (t if t.stride(-1) == 1 else t.contiguous() for t in (qweight, qzeros, scales))
    y2 = out.view(M, N)

    if g_idx is None or groups_are_contiguous(g_idx, group_size):
        mode = _WHOLE_INPUT if group_size == -1 else group_size
        g_idx = qweight  # never read: any pointer will do
    else:
        mode = 0
    _, launch, splits = next(r for r in _REGIMES if r[0] is None or M <= r[0])
    if splits:
        ws, cnt = _workspace(x.device, M * N, _cdiv(M, _SMALLEST_BLOCK) * _cdiv(N, _SMALLEST_BLOCK))
    else:
        ws, cnt = _workspace(x.device, 0, 0)

    def grid(meta):
        tiles = _cdiv(M, meta.get("BLOCK_M", 1)) * _cdiv(N, meta["BLOCK_N"])
        return tiles, meta["SPLIT_K"]

    extra = {"DOT_F32": INTERPRETED and x.dtype == torch.bfloat16} if "DOT_F32" in launch.arg_names else {}
    launch[grid](x2, qweight, qzeros, scales, g_idx, y2, ws, cnt,
                 M, N, K, qweight.shape[0], x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
                 y2.stride(0), _next_power_of_2(M), _MAGIC, BITS=bits, GROUP_SIZE=mode, ZERO_OFFSET=zero_offset,
                 **extra)
    return out
