"""The output formats, registered in one place. Each declares what it supports and checks its own options
(`validate`), decides from the model's shapes alone which linears it quantizes (`plan`), and opens the sink
the pipeline hands each finished block to (`open`). Adding a format is one class here and its sink."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import UserError


@dataclass
class Plan:
    """What a run will write, fixed before any work."""

    targets: list[str]  # full names of the linears to quantize, in block and solve order
    skipped: list[str] = field(default_factory=list)  # linears the format cannot store quantized: kept in float
    grid: object | None = None  # a solver onto the format's own grid (GGUF block types); None: the integer grid
    types: dict = field(default_factory=dict)  # GGUF: tensor name -> block type
    names: dict = field(default_factory=dict)  # GGUF: HF tensor name -> GGUF name
    overrides: dict = field(default_factory=dict)  # integer grid: linear -> its own QuantSpec (mixed precision)
    allocation: object | None = None  # allocation.Allocation behind the overrides or types (--target-bpw)


def packable(in_features: int, out_features: int, bits: int, layout: str = "gptq", group_size: int = -1) -> bool:
    """Both layouts need whole int32 words along both dimensions; awq also needs whole groups (without a
    g_idx it cannot describe a short last group)."""
    words = in_features * bits % 32 == 0 and out_features * bits % 32 == 0
    return words and (layout != "awq" or group_size == -1 or in_features % group_size == 0)


def _block_linears(checkpoint) -> list[tuple[str, tuple[int, ...]]]:
    """(full name, weight shape) of every linear the family's adapter names, block by block."""
    adapter, shapes = checkpoint.adapter, checkpoint.state_shapes()
    return [(adapter.block_prefix(i) + name, tuple(shapes[adapter.block_prefix(i) + name + ".weight"].shape))
            for i in range(len(adapter.blocks(checkpoint.model))) for name in adapter.for_block(i).linears()]


class IntegerLayout:
    """Packed safetensors checkpoints: the gptq layout (any of 2/3/4/8 bits, g_idx) or AWQ's GEMM layout.
    Mixed precision (gptq layout): every linear may take bits in MIXED_BITS and a group in MIXED_GROUPS; the
    linears a runtime fuses (q/k/v, gate/up) take one setting together."""

    single_file = False
    MIXED_BITS = (2, 3, 4, 8)
    MIXED_GROUPS = (32, 64, 128)

    def __init__(self, name: str):
        self.name = name

    def validate(self, config) -> None:
        if config.method == "imatrix":
            raise UserError("--method imatrix weights GGUF block fits; use it with --format gguf")
        if config.tensor_types or config.gguf_type != "Q4_K_M":
            raise UserError("--gguf-type and --tensor-type belong to --format gguf")
        if self.name == "awq" and config.bits != 4:
            raise UserError(f"the awq (GEMM) format stores 4-bit weights only, not {config.bits}; "
                            f"use --bits 4 or --format gptq")
        act_order, static_groups = config.gptq_order()
        if self.name == "awq" and act_order and not static_groups:
            raise UserError("the awq format has no g_idx: with --format awq, --act-order needs static groups")

    def plan(self, checkpoint, config) -> Plan:
        spec, plan = config.spec(), Plan([])
        bits = self.MIXED_BITS if config.target_bpw is not None else (spec.bits,)
        for name, (out_f, in_f) in _block_linears(checkpoint):
            fits = any(packable(in_f, out_f, b, self.name, spec.group_size) for b in bits)
            (plan.targets if fits else plan.skipped).append(name)
        return plan

    # ------------------------------------------------------------------ mixed precision (see allocation.py)

    def units(self, checkpoint, plan: Plan) -> list[tuple[str, ...]]:
        """The linears that take one setting: each sequential group (q/k/v, gate/up: what vLLM fuses)."""
        adapter, targets = checkpoint.adapter, set(plan.targets)
        return [unit for i in range(len(adapter.blocks(checkpoint.model)))
                for group in adapter.for_block(i).sequential
                if (unit := tuple(adapter.block_prefix(i) + n for n in group if adapter.block_prefix(i) + n in targets))]

    def candidates(self, out_f: int, in_f: int) -> list[tuple[tuple[int, int], int]]:
        """(setting, bytes) for each (bits, group size) the layout can pack a weight [out_f, in_f] with."""
        from .hf import packed_bytes

        return [((bits, group), packed_bytes(in_f, out_f, bits, group, self.name))
                for bits in self.MIXED_BITS for group in self.MIXED_GROUPS
                if packable(in_f, out_f, bits, self.name, group)]

    @staticmethod
    def rounded(config, weight, setting, importance):
        """The weight as the grid of `setting` rounds it, without calibration beyond `importance` (per input);
        the clip search in its coarse steps only (a price, not the weight written)."""
        from ..numerics.grid import fit, quantize

        spec = replace(config.spec(), bits=setting[0], group_size=setting[1])
        return quantize(weight, *fit(weight, spec, importance, fine=False), spec).dequantize()

    @staticmethod
    def describe(setting) -> str:
        return f"W{setting[0]} g{setting[1]}"

    def apply(self, config, plan: Plan, allocation):
        """(config with the most common setting as the file's own, plan with every other linear's override)."""
        settings = allocation.settings()
        counts = Counter(settings.values())
        bits, group = max(counts, key=lambda s: (counts[s], s))
        config = replace(config, bits=bits, group_size=group)
        overrides = {n: replace(config.spec(), bits=b, group_size=g) for n, (b, g) in settings.items()
                     if (b, g) != (bits, group)}
        return config, replace(plan, overrides=overrides, allocation=allocation)

    def open(self, tmp: Path, checkpoint, config, plan: Plan, tokenizer, source: str):
        from .hf import HFSink, awq_config, gptq_config

        spec, adapter = config.spec(), checkpoint.adapter
        meta = {"command": config.as_command(source)}  # what the card shows to reproduce the run
        if config.method != "rtn":
            meta["calibration"] = f"{config.calib}, {config.n_samples} x {config.seqlen} tokens, seed {config.seed}"
        skipped = [adapter.to_disk(n) for n in plan.skipped]  # the float checkpoint's names, as the file's
        first = adapter.block_prefix(0)
        in_block = [adapter.to_disk(first + n).removeprefix(first) for n in adapter.linears()]
        if self.name == "awq":
            q = awq_config(spec.group_size, spec.sym, method=config.method, skipped=skipped, clip=spec.clip,
                           source=source, **meta)
        else:
            act_order, static_groups = config.gptq_order()
            mixed = {}
            if plan.allocation is not None:
                mixed = {tuple(adapter.to_disk(n) for n in unit): choice.setting
                         for unit, choice in plan.allocation.chosen.items() if unit[0] in plan.overrides}
                meta["target_bpw"] = config.target_bpw
            q = gptq_config(spec.bits, spec.group_size, spec.sym, desc_act=act_order and not static_groups,
                            method=config.method, skipped=skipped, clip=spec.clip, source=source,
                            damp_percent=config.damp, static_groups=static_groups, block_linears=in_block,
                            blocks=len(adapter.blocks(checkpoint.model)),
                            checkpoint_format=config.checkpoint_format, mixed=mixed, **meta)
        return HFSink(tmp, checkpoint.state_shapes(), plan.targets, q, checkpoint.model.config.to_dict(),
                      checkpoint.path, checkpoint.read, rename=adapter.to_disk)

    def figures(self, out: Path, sink) -> dict:
        from .hf import describe

        info = describe(out)
        return {"size_bytes": info["size_bytes"], "bpw": info["bpw"], "bits_per_parameter": info["bits_per_parameter"]}


GGUF_METHODS = ("rtn", "imatrix", "gptq", "awq")
GGUF_MODE = {"rtn": "reference", "imatrix": "imatrix", "gptq": "gptq", "awq": "reference"}


class GGUFFile:
    """One llama.cpp GGUF file with a named mix of block types (Q4_K_M, ...)."""

    name = "gguf"
    single_file = True

    def validate(self, config) -> None:
        from .gguf.mixes import MIXES, parse_overrides

        if config.method not in GGUF_METHODS:
            raise UserError(f"--format gguf takes --method {', '.join(GGUF_METHODS)}, not {config.method}")
        if config.gguf_type not in MIXES:
            raise UserError(f"unknown --gguf-type '{config.gguf_type}'; choose one of {', '.join(MIXES)}")
        parse_overrides(config.tensor_types)
        if config.act_order or config.static_groups:
            raise UserError("GGUF block fits solve columns in order: --act-order and --static-groups belong to "
                            "--format gptq or awq")

    def plan(self, checkpoint, config) -> Plan:
        from ..quant.ggml_solver import BlockSolver
        from .gguf.mixes import TensorInfo, parse_overrides, tensor_types
        from .gguf.writer import arch_of, by_tensor, gguf_name

        cfg, shapes = checkpoint.model.config, checkpoint.state_shapes()
        arch = arch_of(checkpoint.adapter)
        names = {hf: gguf_name(hf, arch, cfg.num_hidden_layers, checkpoint.adapter) for hf in shapes}
        infos = [TensorInfo(g, (len(hfs), *shapes[hfs[0]].shape) if len(hfs) > 1 else tuple(shapes[hfs[0]].shape))
                 for g, hfs in by_tensor(names).items()]  # experts: several HF tensors, one 3D GGUF tensor
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        types = tensor_types(infos, config.gguf_type, cfg.num_attention_heads // n_kv, checkpoint.tied,
                             has_imatrix=config.method != "rtn", overrides=parse_overrides(config.tensor_types),
                             n_expert=checkpoint.adapter.n_experts)
        linears = [name for name, _ in _block_linears(checkpoint)]
        linear_types = {name: types[names[name + ".weight"]] for name in linears}
        grid = BlockSolver(linear_types, GGUF_MODE[config.method], config.damp, config.float_targets)
        return Plan(linears, grid=grid, types=types, names=names)

    # ------------------------------------------------------------------ mixed precision (see allocation.py)

    def units(self, checkpoint, plan: Plan) -> list[tuple[str, ...]]:
        """The linears that take one type: those stored in one GGUF tensor (a layer's experts), else each alone."""
        units: dict[str, list[str]] = {}
        for name in plan.targets:
            units.setdefault(plan.names[name + ".weight"], []).append(name)
        return [tuple(names) for names in units.values()]

    def candidates(self, out_f: int, in_f: int) -> list[tuple[object, int]]:
        """(type, bytes) for each block type llama-quantize can place on a weight [out_f, in_f] (K-types need
        rows of whole 256-wide super-blocks)."""
        from gguf import GGML_QUANT_SIZES

        from .gguf.mixes import MIXED_TYPES

        return [(kind, out_f * in_f // GGML_QUANT_SIZES[kind][0] * GGML_QUANT_SIZES[kind][1])
                for kind in MIXED_TYPES if in_f % GGML_QUANT_SIZES[kind][0] == 0]

    @staticmethod
    def rounded(config, weight, kind, importance):
        """The weight as block type `kind` encodes it, weighted by `importance` (per input: the imatrix)."""
        from ..numerics.ggml import CODECS, BlockTensor

        return BlockTensor(kind, CODECS[kind.name].quantize(weight, importance), weight.shape[1]).dequantize()

    @staticmethod
    def describe(kind) -> str:
        return kind.name

    def apply(self, config, plan: Plan, allocation):
        """(config, plan with the allocated type of every linear's tensor; the others keep the mix's)."""
        from ..quant.ggml_solver import BlockSolver

        settings = allocation.settings()
        types = {**plan.types, **{plan.names[n + ".weight"]: kind for n, kind in settings.items()}}
        grid = BlockSolver(settings, GGUF_MODE[config.method], config.damp, config.float_targets, allocation.fisher)
        return config, replace(plan, types=types, grid=grid, allocation=allocation)

    def open(self, tmp: Path, checkpoint, config, plan: Plan, tokenizer, source: str):
        from .gguf.mixes import MIXES
        from .gguf.writer import GGUFSink

        adapter = checkpoint.adapter
        blocks = range(len(adapter.blocks(checkpoint.model)))
        outside = {n for n in plan.names if not any(n.startswith(adapter.block_prefix(i)) for i in blocks)}
        return GGUFSink(tmp, checkpoint.model.config, adapter, checkpoint.path, tokenizer, checkpoint.state_shapes(),
                        plan.types, plan.names, MIXES[config.gguf_type][0], checkpoint.read, outside)

    def figures(self, out: Path, sink) -> dict:
        return {"size_bytes": out.stat().st_size, "bpw": sink.bpw,
                "bits_per_parameter": 8 * out.stat().st_size / sink.params,
                "gguf_types": {g: t.name for g, t in sink.types.items()}}


FORMATS = {"gptq": IntegerLayout("gptq"), "awq": IntegerLayout("awq"), "gguf": GGUFFile()}


def format_for(name: str):
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown format '{name}'; choose one of {', '.join(FORMATS)}") from None
