"""Where a checkpoint runs: which runtimes load it, and on which kernel, from the settings it was written with
and the shapes of its packed linears.

The rules were read from the runtimes' loaders (no runtime is imported here), in these versions:
vLLM 0.34 (`auto_gptq`/`auto_awq` and `choose_mp_linear_kernel`; since 0.22 every gptq checkpoint goes to the
Marlin family, and 0.30 dropped desc_act), GPTQModel 7.7 (`select_quant_linear` and each kernel's SUPPORTS_*
table; its loader's refusal of asymmetric v1 checkpoints from other quantizers), transformers 5.25 with optimum
2.3 (which hand gptq/awq layers to GPTQModel's kernels, one class for the whole model), and llama.cpp for GGUF.
A kernel is named as its runtime names it; "CC" is the CUDA compute capability it needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

VLLM = "vLLM (0.34)"
GPTQMODEL = "GPTQModel (7.7)"
TRANSFORMERS = "transformers (5.x, with optimum + gptqmodel)"
LLMQUANT = "llmquant"
MARLIN_GROUPS = (-1, 32, 64, 128)  # vLLM's and GPTQModel's Marlin, ExllamaV2, Swordfish
MACHETE_GROUPS = (-1, 64, 128)
ATEN_GROUPS = (32, 64, 128, 256)  # PyTorch's int4 CPU kernel (GPTQModel's TorchAten kernels)


@dataclass(frozen=True)
class Runtime:
    name: str
    loads: bool
    how: str  # the kernel it takes, or why it refuses

    def to_dict(self) -> dict:
        return asdict(self)


def _whole_groups(shapes, group_size: int) -> int | None:
    """The first input width that is not a whole number of groups (None: every one is)."""
    return next((k for k, _ in shapes if group_size != -1 and k % group_size), None)


def _all(shapes, k: int = 1, n: int = 1) -> bool:
    return all(kk % k == 0 and nn % n == 0 for kk, nn in shapes)


def _vllm_gptq(q: dict, shapes) -> Runtime:
    bits, sym, group = q["bits"], q["sym"], q["group_size"]
    if not sym or bits not in (4, 8):
        what = "asymmetric grids" if not sym else f"{bits}-bit weights"
        return Runtime(VLLM, False, f"refuses {what}: since 0.22 it serves only symmetric 4- and 8-bit GPTQ "
                                    f"(0.21 and older ran them on the slower gptq_gemm kernel)")
    if q.get("desc_act") and group != -1:
        return Runtime(VLLM, False, "refuses desc_act (a permuted g_idx) since 0.30; act-order with static groups "
                                    "(the default) keeps g_idx plain")
    if group not in MARLIN_GROUPS:
        return Runtime(VLLM, False, f"refuses group size {group} (Marlin takes {', '.join(map(str, MARLIN_GROUPS))})")
    bad = _whole_groups(shapes, group)
    if bad is not None:
        return Runtime(VLLM, False, f"Marlin needs whole groups: an input width of {bad} is not a multiple of "
                                    f"{group} (a group size that divides every width serves)")
    machete = group in MACHETE_GROUPS and _all(shapes, 64, 128)
    return Runtime(VLLM, True, "Marlin (CC >= 7.5)" + ("; Machete on Hopper (CC 9.0)" if machete else ""))


def _vllm_awq(q: dict, shapes) -> Runtime:
    group = q["group_size"]
    if group in MARLIN_GROUPS and _whole_groups(shapes, group) is None:
        machete = group in MACHETE_GROUPS and _all(shapes, 64, 128)
        return Runtime(VLLM, True, "AWQ Marlin (CC >= 7.5)" + ("; Machete on Hopper (CC 9.0)" if machete else ""))
    return Runtime(VLLM, True, "the AWQ GEMM kernel (slower: Marlin needs whole groups of -1/32/64/128)")


def _gptqmodel_gate(q: dict) -> str | None:
    """GPTQModel's loader refuses asymmetric v1 checkpoints unless GPTQModel >= 0.9 wrote them (it cannot tell
    whether the zero points follow its own convention)."""
    if q["sym"] or q.get("checkpoint_format", "gptq") != "gptq":
        return None
    quantizers = (q.get("meta") or {}).get("quantizer") or []
    if any(str(name).startswith("gptqmodel:") for name in quantizers):
        return None
    return "refuses asymmetric checkpoints in the v1 format from other quantizers: write --checkpoint-format gptq_v2"


def _gptq_cuda_kernel(q: dict, shapes) -> str:
    bits, sym, group = q["bits"], q["sym"], q["group_size"]
    by32 = _all(shapes, 32, 32)
    if bits in (4, 8) and sym and group in MARLIN_GROUPS:
        return "Marlin (CC >= 7.5)"
    if bits == 4 and group in MARLIN_GROUPS and by32:
        return "ExllamaV2"
    if bits in (2, 4, 8) and by32:
        return "Triton"
    return "Torch (dequantizes per call)"


def _cpu_kernel(q: dict, shapes, method: str) -> str:
    """The default CPU kernel of GPTQModel (and so of transformers): the int4 kernels need whole groups and
    output widths in multiples of 32; a layer they cannot take fails the whole load (one class is chosen for the
    model), where backend="torch" loads any shape."""
    group = q["group_size"]
    if q["bits"] != 4:
        return "Torch"
    bad = _whole_groups(shapes, group)
    if bad is None and _all(shapes, 1, 32) and group in ATEN_GROUPS:
        return f"Torch{'Awq' if method == 'awq' else ''} int4 (AVX512-BF16 or ATen)"
    width = f"an input width of {bad} (not a whole number of groups of {group})" if bad is not None else (
        f"group size {group}" if group not in ATEN_GROUPS else "an output width not a multiple of 32")
    return f"the default int4 kernel refuses {width}: load with backend=\"torch\""


def _settings(q: dict) -> list[dict]:
    """The base setting and every per-module one `dynamic` gives (mixed precision); "-:" keys name float
    modules, not settings."""
    overrides = [v for k, v in (q.get("dynamic") or {}).items() if not k.startswith("-:") and v]
    return [q, *({**q, **v} for v in overrides)]


def _mixed_runtimes(q: dict, shapes) -> list[Runtime]:
    """Mixed precision: a runtime loads it only if it reads `dynamic` and takes every setting in it."""
    settings = _settings(q)
    refusals = [r for r in (_vllm_gptq(s, shapes) for s in settings) if not r.loads]
    vllm = refusals[0] if refusals else _vllm_gptq(q, shapes)
    bits = sorted({s["bits"] for s in settings})
    gptqmodel = Runtime(GPTQMODEL, True, f"reads `dynamic` (bits {'/'.join(map(str, bits))}), a kernel per layer; "
                                         f"v1 checkpoints need GPTQModel >= 7.3.2 (older versions misread the zero "
                                         f"points of layers whose bits differ from the top level)")
    gate = _gptqmodel_gate(q)
    return [
        vllm,
        Runtime(GPTQMODEL, False, gate) if gate else gptqmodel,
        Runtime(TRANSFORMERS, False, "ignores `dynamic` (per-layer bits and group sizes): it builds every layer at "
                                     "the top-level setting, and the load stops at the first layer whose tensors "
                                     "have other shapes"),
        Runtime(LLMQUANT, True, "reads `dynamic`; CPU: PyTorch's int4 weight-only kernel, each layer at its own bits; "
                                "CUDA: Triton dequant-matmul"),
    ]


def gptq_runtimes(q: dict, shapes: list[tuple[int, int]]) -> list[Runtime]:
    """Runtimes for a gptq checkpoint; shapes are the packed linears' (in_features, out_features)."""
    if len(_settings(q)) > 1:
        return _mixed_runtimes(q, shapes)
    gate = _gptqmodel_gate(q)
    kernels = f"CUDA: {_gptq_cuda_kernel(q, shapes)}; CPU: {_cpu_kernel(q, shapes, 'gptq')}"
    v1 = q.get("checkpoint_format", "gptq") == "gptq"
    return [
        _vllm_gptq(q, shapes),
        Runtime(GPTQMODEL, False, gate) if gate else Runtime(GPTQMODEL, True, kernels),
        Runtime(TRANSFORMERS, True, kernels + ("; v1 zero points converted to v2 on load" if v1 and not q["sym"] else "")),
        Runtime(LLMQUANT, True, "CPU: PyTorch's int4 weight-only kernel; CUDA: Triton dequant-matmul"),
    ]


def awq_runtimes(q: dict, shapes: list[tuple[int, int]]) -> list[Runtime]:
    kernels = f"CUDA: Machete (CC 9.0), Marlin (CC >= 8.0), ExllamaV2 or GEMM; CPU: {_cpu_kernel(q, shapes, 'awq')}"
    return [_vllm_awq(q, shapes), Runtime(GPTQMODEL, True, kernels), Runtime(TRANSFORMERS, True, kernels),
            Runtime(LLMQUANT, True, "CPU: PyTorch's int4 weight-only kernel; CUDA: Triton dequant-matmul")]


def gguf_runtimes() -> list[Runtime]:
    return [Runtime("llama.cpp (llama-cli, llama-server; Ollama, LM Studio, llama-cpp-python)", True,
                    "its own CPU/GPU kernels for every block type written"),
            Runtime(LLMQUANT, True, "CPU: blocks kept as they are (Q4_0/Q4_1/Q4_K on PyTorch's int4 kernel, "
                                    "Q5/Q8_0 as two int4 halves, Q2_K/Q3_K/Q6_K dequantized per call); "
                                    "GPU: weights decoded to float when loaded")]


def runtimes(q: dict, shapes: list[tuple[int, int]]) -> list[Runtime]:
    return gptq_runtimes(q, shapes) if q["quant_method"] == "gptq" else awq_runtimes(q, shapes)
