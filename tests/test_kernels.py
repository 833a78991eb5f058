"""Triton gptq dequant-matmul kernels against a float64 torch reference written from the layout.

Interpreter checks (CPU). TRITON_INTERPRET must be set before triton itself is imported: triton's
own library functions are compiled or interpreted at that moment, so setting it later in a process
where another test already imported triton does not work. The checks therefore run in one worker
process per module (this file run as a script), which sets the variable before anything imports
triton; the pytest process never has it set, so no other test (and no GPU test) gets interpreted
kernels by accident. Each case draws fresh random data from a seed the test picks and reports.

GPU checks (@pytest.mark.gpu) run the same comparison in-process with compiled kernels at real sizes.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # worker mode: before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import itertools
import json
import math
import subprocess
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# One M per kernel regime: GEMV (1), skinny split-K (<= 16), mid split-K (<= 256), tiled GEMM.
M_REGIMES = (1, 7, 40, 300)
# ||y - ref|| / ||ref||. The interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest,
# which about doubles the bf16 error there (~6e-3 seen against ~3e-3).
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}
# largest single-element error, in units of the tolerance times the rms of the reference
ELEMENT_FACTOR = 12.0


# ---------------------------------------------------------------------------------------------
# Reference: the gptq layout (v1 and v2), written from its description (not from the kernels or the writer).

def pack_stream(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes in [0, 2^bits) along `dim` as a little-endian bit stream cut into int32 words (the last
    word zero-padded): code j occupies bits [bits*j, bits*j + bits) of the stream."""
    x = codes.movedim(dim, -1).to(torch.int64)
    n = x.shape[-1]
    stream = ((x[..., None] >> torch.arange(bits)) & 1).flatten(-2)
    words = math.ceil(n * bits / 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits)).unflatten(-1, (words, 32))
    packed = (stream << torch.arange(32)).sum(-1)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_stream(words: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """Inverse of pack_stream: the first n codes (int64) along `dim`."""
    x = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    stream = ((x[..., None] >> torch.arange(32)) & 1).flatten(-2)[..., : n * bits].unflatten(-1, (n, bits))
    return (stream << torch.arange(bits)).sum(-1).movedim(-1, dim)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits, in_features, zero_offset=1) -> torch.Tensor:
    """W [out, in] in float64: W[o, i] = (q[i, o] - zero[g, o]) * scale[g, o], g = g_idx[i], where the
    stored zero field holds zero - 1 (v1, zero_offset 1) or the zero itself (v2, zero_offset 0)."""
    out_features = qweight.shape[1]
    q = unpack_stream(qweight.cpu(), bits, 0, in_features)  # [in, out]
    zero = unpack_stream(qzeros.cpu(), bits, 1, out_features) + zero_offset  # [groups, out]
    g = g_idx.cpu().long()
    return ((q - zero[g]).double() * scales.cpu().double()[g]).T.contiguous()


def make_case(bits, group_size, sym, act_order, dtype, M, K, N, seed, zero_offset=1, device="cpu"):
    """Random packed weights (full code range; asym zero fields take every value, all-ones included),
    activations, and the float64 reference y [M, N]."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    groups = 1 if group_size == -1 else math.ceil(K / group_size)
    codes = torch.randint(0, maxq + 1, (K, N), generator=gen)
    stored = torch.full((groups, N), (1 << (bits - 1)) - zero_offset) if sym else torch.randint(0, maxq + 1, (groups, N),
                                                                                     generator=gen)
    scales = ((torch.rand(groups, N, generator=gen) + 0.25) * 0.02).to(torch.float16)
    g_idx = torch.arange(K) // (K if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    x = torch.randn(M, K, generator=gen).to(dtype)
    tensors = {"qweight": pack_stream(codes, bits, 0), "qzeros": pack_stream(stored, bits, 1), "scales": scales,
               "g_idx": g_idx.to(torch.int32)}
    ref = x.double() @ dequantize_gptq(*tensors.values(), bits, K, zero_offset).T
    return x.to(device), {k: v.to(device) for k, v in tensors.items()}, ref


def errors(y: torch.Tensor, ref: torch.Tensor) -> dict:
    y = y.double().cpu()
    diff = y - ref
    rms = ref.pow(2).mean().sqrt().item()
    return {"finite": bool(torch.isfinite(y).all()), "rel": (diff.norm() / ref.norm()).item(),
            "max_rel": (diff.abs().max().item() / rms) if rms else 0.0}


def run_case(kernels, case: dict, device="cpu") -> dict:
    x, t, ref = make_case(case["bits"], case["group_size"], case["sym"], case["act_order"], DTYPES[case["dtype"]],
                          case["M"], case["K"], case["N"], case["seed"], case["zero_offset"], device)
    out = torch.full((case["M"], case["N"]), float("nan"), dtype=x.dtype, device=device)  # poison
    # contiguous groups go in both ways: as g_idx None, and as the default g_idx the kernels must recognise
    g_idx = None if case["sym"] and not case["act_order"] else t["g_idx"]
    y = kernels.gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], g_idx, case["bits"], case["group_size"],
                            out=out, zero_offset=case["zero_offset"])
    assert y is out
    return errors(y, ref)


def check(result: dict, case: dict):
    tol = TOLERANCE[case["dtype"]]
    where = f"case {case} (rerun with LLMQUANT_TEST_SEED={case['seed']})"
    assert "error" not in result, f"{where}: kernel raised\n{result.get('error')}"
    assert result["finite"], f"{where}: output has unwritten (NaN) or non-finite elements"
    assert result["rel"] < tol, f"{where}: relative error {result['rel']:.3g} >= {tol}"
    assert result["max_rel"] < ELEMENT_FACTOR * tol, \
        f"{where}: worst element off by {result['max_rel']:.3g} x rms(ref), limit {ELEMENT_FACTOR * tol:.3g}"


def fresh_seed() -> int:
    return int(os.environ.get("LLMQUANT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


# ---------------------------------------------------------------------------------------------
# Interpreter worker (this file run as a script) and its client.

def _import_kernels():
    from llmquant.kernels import gptq
    return gptq


def _worker():
    """Answer one JSON case per stdin line with one JSON result line; prints go to stderr."""
    protocol = sys.stdout
    sys.stdout = sys.stderr
    kernels = _import_kernels()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request.get("probe") == "workspace":
                result = {"dirty": sum(int(t.count_nonzero()) for pair in kernels._workspaces.values() for t in pair)}
            else:
                result = run_case(kernels, request)
        except Exception:  # noqa: BLE001 - any failure goes back to the test that asked
            result = {"error": traceback.format_exc()}
        protocol.write(json.dumps(result) + "\n")
        protocol.flush()


class Interpreter:
    def __init__(self):
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"interpreter worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    worker = Interpreter()
    yield worker
    worker.close()


def _shape(index: int, M: int) -> dict:
    """In/out sizes that are not multiples of the block sizes; some need padded words (3-bit 200 inputs,
    130 outputs at 4 bits), groups whose last one is short (200 = 128 + 72)."""
    K = (96, 200, 288)[index % 3]
    N = (40, 96, 130)[(index // 3) % 3]
    return {"M": M, "K": K if M < 256 else 160, "N": N}


def _pairwise_cases() -> list[dict]:
    """A covering set: every pair of values of any two factors appears in some case (greedy all-pairs)."""
    factors = {"bits": BITS, "group_size": GROUPS, "sym": (False, True), "act_order": (False, True),
               "dtype": tuple(DTYPES), "M": M_REGIMES, "zero_offset": (1, 0)}
    names = list(factors)
    rows = [dict(zip(names, values)) for values in itertools.product(*factors.values())]
    uncovered = {((a, row[a]), (b, row[b])) for row in rows for a, b in itertools.combinations(names, 2)}
    chosen = []
    while uncovered:
        best = max(rows, key=lambda r: sum(((a, r[a]), (b, r[b])) in uncovered
                                           for a, b in itertools.combinations(names, 2)))
        uncovered -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
        chosen.append(best)
    return chosen


PAIRWISE = _pairwise_cases()
EXHAUSTIVE = [dict(zip(("bits", "group_size", "sym", "act_order", "dtype", "M", "zero_offset"), values))
              for values in itertools.product(BITS, GROUPS, (False, True), (False, True), tuple(DTYPES), M_REGIMES,
                                              (1, 0))]


def _case_id(case: dict) -> str:
    return (f"w{case['bits']}-g{case['group_size']}-{'sym' if case['sym'] else 'asym'}-"
            f"{'act' if case['act_order'] else 'seq'}-{case['dtype']}-M{case['M']}-{'v1' if case['zero_offset'] else 'v2'}")


@pytest.mark.parametrize("index, case", list(enumerate(PAIRWISE)), ids=[_case_id(c) for c in PAIRWISE])
def test_kernel_matches_reference(interp, index, case):
    case = {**case, **_shape(index, case["M"]), "seed": fresh_seed()}
    check(interp.ask(case), case)


@pytest.mark.slow
@pytest.mark.parametrize("index, case", list(enumerate(EXHAUSTIVE)), ids=[_case_id(c) for c in EXHAUSTIVE])
def test_kernel_matches_reference_exhaustive(interp, index, case):
    case = {**case, **_shape(index, case["M"]), "seed": fresh_seed()}
    check(interp.ask(case), case)


def test_split_k_leaves_workspace_clean(interp):
    """Split-K programs zero the workspace and counters behind them; a leftover would corrupt the next call."""
    case = {"bits": 4, "group_size": 64, "sym": False, "act_order": False, "dtype": "float16", "M": 3, "K": 512,
            "N": 48, "seed": fresh_seed(), "zero_offset": 1}
    for _ in range(2):  # the second call starts from whatever the first one left
        check(interp.ask(case), case)
    assert interp.ask({"probe": "workspace"}) == {"dirty": 0}


def test_pairwise_cases_cover_every_value():
    for name, values in (("bits", BITS), ("group_size", GROUPS), ("M", M_REGIMES), ("dtype", tuple(DTYPES))):
        assert {c[name] for c in PAIRWISE} == set(values)
    assert len(PAIRWISE) <= 24


# ---------------------------------------------------------------------------------------------
# Host-side checks (no kernel launch).

def test_reference_packing_matches_the_writer():
    """The reference layout here is the one llmquant's writer produces."""
    from llmquant.numerics.pack import pack_int32, unpack_int32

    gen = torch.Generator().manual_seed(fresh_seed())
    for bits in BITS:
        codes = torch.randint(0, 1 << bits, (64, 96), generator=gen)
        assert torch.equal(pack_stream(codes, bits, 0), pack_int32(codes, bits, dim=0))
        assert torch.equal(pack_stream(codes, bits, 1), pack_int32(codes, bits, dim=1))
        assert torch.equal(unpack_stream(pack_stream(codes, bits, 1), bits, 1, 96), codes)
        assert torch.equal(unpack_int32(pack_stream(codes, bits, 0), bits, dim=0).long(), codes)


def test_three_bit_straddles_words():
    """Inputs 10 and 21 of each 32 straddle word boundaries: 2 + 1 and 1 + 2 bits."""
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b111
    words = pack_stream(codes, 3, 0)[:, 0].tolist()
    assert words == [-(1 << 31) + (1 << 30), 1, 0]
    codes[10], codes[21] = 0, 0b111
    assert pack_stream(codes, 3, 0)[:, 0].tolist() == [0, -(1 << 31), 0b11]


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    return _import_kernels()


def test_default_groups_are_detected_once(kernels):
    g_idx = (torch.arange(300) // 128).to(torch.int32)
    assert kernels.groups_are_contiguous(g_idx, 128)
    assert not kernels.groups_are_contiguous(g_idx, 64)
    g_idx[:2] = g_idx[:2].flip(0) + 1  # in place: the cached answer must not survive
    assert not kernels.groups_are_contiguous(g_idx, 128)
    assert kernels.groups_are_contiguous(torch.zeros(77, dtype=torch.int32), -1)


def test_rejects_inconsistent_tensors(kernels):
    x, t, _ = make_case(4, 32, False, False, torch.float16, 2, 96, 40, 0)
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    with pytest.raises(ValueError, match="bits"):
        kernels.gptq_matmul(x, *args, 5, 32)
    with pytest.raises(ValueError, match="qweight"):
        kernels.gptq_matmul(x[:, :64], *args, 4, 32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        kernels.gptq_matmul(x.float(), *args, 4, 32)
    with pytest.raises(ValueError, match="qzeros"):
        kernels.gptq_matmul(x, t["qweight"], t["qzeros"][:, :2], t["scales"], t["g_idx"], 4, 32)


def test_host_arithmetic_matches_triton(kernels):
    """The launch path's plain-int ceil division and power of two agree with triton's own."""
    import triton

    for a in (*range(1, 300), 4095, 4096, 4097, 14336, 2**20 + 1):
        assert kernels._next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 2, 16, 32, 128, 132, 256):
            assert kernels._cdiv(a, b) == triton.cdiv(a, b)


def test_available_reflects_the_machine(kernels):
    from llmquant.nn import qlinear
    runs_here = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    assert (qlinear._load_kernels() is kernels) == runs_here


# ---------------------------------------------------------------------------------------------
# Compiling for an H100 needs no GPU (triton ships ptxas): catches what the interpreter lets through.

def _sm90_stack_bytes(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int) -> int:
    """Compile like a launch would (pointers and sizes 16-divisible); the kernel's local-memory stack."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    types = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "scales_ptr": "*fp16", "ws_ptr": "*fp32"}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "*i32" if n.endswith("_ptr") else "i32")
                 for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n] != "constexpr" and n not in ("M", "M_BUCKET")}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmquant_{os.getpid()}_{fn.__name__}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    try:
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    finally:
        cubin.unlink()
    return int(usage.split("STACK:")[1].split()[0])


@pytest.mark.slow
@pytest.mark.parametrize("bits", BITS)
def test_kernels_compile_for_h100_without_spills(bits):
    """Each regime's first config builds for sm_90 and, for contiguous groups, keeps everything in
    registers (no local-memory stack); act-order builds too."""
    pytest.importorskip("triton")
    gptq = _import_kernels()
    if gptq.INTERPRETED:
        pytest.skip("the kernels were imported interpreted (TRITON_INTERPRET=1 in the test process)")
    for index, (_, launcher, splits) in enumerate(gptq._REGIMES):
        config = launcher.configs[0]
        fn = launcher.fn.fn if splits else launcher.fn  # under the split-K heuristic
        for group_size in (128, 0):
            constexprs = {"BITS": bits, "GROUP_SIZE": group_size, "SPLIT_K": 4 if splits else 1, **config.kwargs}
            if "DOT_F32" in fn.arg_names:
                constexprs["DOT_F32"] = False
            stack = _sm90_stack_bytes(fn, ("fp16", "bf16")[index % 2], constexprs, config.num_warps,
                                      config.num_stages)
            if group_size:
                assert stack == 0, f"{fn.__name__} {config} at {bits} bits spills {stack} bytes"


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at real sizes.

def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: compiled Triton kernels cannot run on this machine")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in the test process: the kernels would run interpreted")
    pytest.importorskip("triton")
    return _import_kernels()


GPU_SHAPES = ((4096, 14336), (14336, 4096), (4096, 1024))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, act_order", [(128, False), (128, True), (32, False), (-1, False)])
@pytest.mark.parametrize("M", (1, 16, 64, 2048))
def test_gpu_matches_reference(bits, group_size, act_order, M):
    kernels = _cuda_or_skip()
    for index, (K, N) in enumerate(GPU_SHAPES if M < 2048 else GPU_SHAPES[:1]):
        dtype = ("float16", "bfloat16")[index % 2]
        case = {"bits": bits, "group_size": group_size, "sym": index == 2, "act_order": act_order, "dtype": dtype,
                "M": M, "K": K, "N": N, "seed": fresh_seed(), "zero_offset": index % 2}
        check(run_case(kernels, case, device="cuda"), case)


@pytest.mark.gpu
def test_gpu_repeated_split_k_calls_agree():
    """Split-K sums are fp32 atomics: reruns may differ by rounding only, never by a stale workspace."""
    kernels = _cuda_or_skip()
    x, t, ref = make_case(4, 128, False, False, torch.float16, 4, 14336, 4096, fresh_seed(), device="cuda")
    ys = [kernels.gptq_matmul(x, *t.values(), 4, 128) for _ in range(5)]
    for y in ys:
        assert errors(y, ref)["rel"] < TOLERANCE["float16"]
        assert (y.float() - ys[0].float()).abs().max().item() <= 2e-3 * ys[0].float().abs().max().item()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
