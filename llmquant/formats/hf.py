"""Packed safetensors checkpoints in the gptq and awq (GEMM) layouts, and their reader.

The folder is what transformers, vLLM and GPTQModel (or AutoAWQ) expect of a gptq ("v1") or awq
checkpoint: config.json with `quantization_config`, quantize_config.json (gptq) or quant_config.json
(awq), weights as (sharded) safetensors, tokenizer and generation config copied from the source model.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError, require_finite
from ..models.loader import tensor_headers
from ..nn.qlinear import QuantLinear
from ..numerics.grid import SUPPORTED_BITS, QuantizedWeight
from ..numerics.pack import ZERO_OFFSETS, pack_awq, pack_gptq, unpack_awq
from ..serving import runtimes
from ..version import __version__
from .atomic import atomic_directory
from .shards import Planned, ShardedWriter

PACKED = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
          "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


def gptq_config(bits: int, group_size: int, sym: bool, desc_act: bool = False, method: str = "rtn",
                skipped: list[str] = (), static_groups: bool = False, block_linears: list[str] = (),
                blocks: int = 0, checkpoint_format: str = "gptq", mixed: dict[tuple[str, ...], tuple[int, int]] = (),
                **meta) -> dict:
    """The `quantization_config` of a gptq checkpoint (also written as quantize_config.json);
    checkpoint_format gptq (v1) or gptq_v2 says how qzeros store the zero point (numerics/pack.py).
    mixed: linears (on-disk names, a unit a runtime fuses) -> the (bits, group size) they take instead."""
    config = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "static_groups": static_groups, "true_sequential": True, "damp_percent": meta.pop("damp_percent", 0.01),
        "checkpoint_format": checkpoint_format, "pack_dtype": "int32", "lm_head": False,
        "meta": {"quantizer": [f"llmquant:{__version__}"], "method": method, **meta},
    }
    if skipped or mixed:
        config["dynamic"] = {**_float_modules(skipped), **_overrides(dict(mixed))}
    if skipped:
        # transformers/optimum ignore `dynamic`; they take a per-block list of the quantized linears,
        # which can say the same thing when the same linears stay in float in every block
        suffixes = {name.split(".", 3)[-1] for name in skipped}
        if blocks and len(skipped) == blocks * len(suffixes):
            config["modules_in_block_to_quantize"] = [[n for n in block_linears if n not in suffixes]]
    return config


def _float_modules(skipped: list[str]) -> dict:
    """GPTQModel's per-module override `dynamic`: a leading "-:" leaves the module in float."""
    return {f"-:^{re.escape(name)}$": {} for name in skipped}


# what vLLM fuses a unit of linears into: its `dynamic` keys are matched against the fused module's name
VLLM_FUSED = {("k_proj", "q_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def _overrides(mixed: dict[tuple[str, ...], tuple[int, int]]) -> dict:
    """GPTQModel's `dynamic` entries for linears with their own bits and group size: one anchored regex per
    unit, naming each linear (GPTQModel matches module by module) and the module vLLM fuses them into."""
    out = {}
    for names, (bits, group_size) in mixed.items():
        parent = names[0].rpartition(".")[0]
        leaves = tuple(sorted(n.rpartition(".")[2] for n in names))
        alternatives = [*leaves, *([VLLM_FUSED[leaves]] if leaves in VLLM_FUSED else [])]
        key = f"+:^{re.escape(parent)}\\.({'|'.join(map(re.escape, alternatives))})$"
        out[key] = {"bits": bits, "group_size": group_size}
    return out


def module_settings(q: dict, name: str) -> dict | None:
    """The bits, group size and symmetry linear `name` (as on disk) is stored with, read as GPTQModel and vLLM
    read `dynamic`: the first key that matches the start of the name wins, "-:" keys (left in float:
    None) before the others."""
    dynamic, base = q.get("dynamic") or {}, {"bits": q["bits"], "group_size": q["group_size"], "sym": q.get("sym")}
    for key in sorted(dynamic, key=lambda k: not k.startswith("-:")):
        if re.match(key.removeprefix("-:").removeprefix("+:"), name):
            return None if key.startswith("-:") else {**base, **dynamic[key]}
    return base


def awq_config(group_size: int, sym: bool, method: str = "awq", skipped: list[str] = (), **meta) -> dict:
    """The transformers `quantization_config` of an AWQ GEMM checkpoint (4-bit). zero_point is always
    on: GEMM kernels always subtract qzeros, and a symmetric grid is stored as the zero 8.
    Float-kept linears are named twice: transformers reads modules_to_not_convert, GPTQModel `dynamic`."""
    config = {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": list(skipped) or None,
        "meta": {"quantizer": [f"llmquant:{__version__}"], "method": method, "sym": sym, **meta},
    }
    if skipped:
        config["dynamic"] = _float_modules(skipped)
    return config


def _autoawq_config(q: dict) -> dict:
    """The same settings under AutoAWQ's own names (its quant_config.json; GPTQModel reads this file first)."""
    out = {"zero_point": q["zero_point"], "q_group_size": q["group_size"], "w_bit": q["bits"],
           "version": q["version"], "modules_to_not_convert": q["modules_to_not_convert"]}
    if "dynamic" in q:
        out["dynamic"] = q["dynamic"]
    return out


FIELD_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied tensors (safetensors stores each tensor once)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


class HFSink:
    """A gptq or awq checkpoint folder written as the blocks finish: every tensor's place is fixed from
    the model's shapes before the first block (formats/shards.py), each block's packed linears and
    float parameters go to disk when it is done, the tensors outside the blocks (embedding, final norm,
    lm_head) are read through `read` at the end, then the configs. `directory` is the atomic temporary."""

    def __init__(self, directory: Path, state: dict[str, torch.Tensor], linears: list[str], quantization_config: dict,
                 config: dict, source_dir: Path, read, max_shard_size: str | int = "4GB", rename=None):
        q = quantization_config
        self.directory, self.q, self.config, self.source_dir, self.read = Path(directory), q, config, source_dir, read
        self.rename = rename or (lambda name: name)  # module name -> the float checkpoint's name for it
        self.pack = pack_awq if q["quant_method"] == "awq" else functools.partial(
            pack_gptq, zero_offset=ZERO_OFFSETS[q["checkpoint_format"]])
        packed = {f"{name}.weight" for name in linears}
        plan = {self.rename(n): Planned(t.dtype, t.shape) for n, t in state.items() if n not in packed}
        for name in linears:
            out_f, in_f = state[f"{name}.weight"].shape
            own = module_settings(q, self.rename(name)) or q
            for field, shape in _expected_shapes(in_f, out_f, own["bits"], own["group_size"], q["quant_method"]).items():
                plan[self.rename(f"{name}.{field}")] = Planned(FIELD_DTYPES[field], shape)
        self.writer = ShardedWriter(self.directory, plan, max_shard_size)

    def write_block(self, index: int, quantized: dict[str, QuantizedWeight], floats: dict[str, torch.Tensor]) -> None:
        for name, qw in quantized.items():
            for field, value in self.pack(qw).items():
                self.writer.put(self.rename(f"{name}.{field}"), value)
        for name, value in floats.items():
            name = self.rename(name)
            self.writer.put(name, value.to(self.writer.plan[name].dtype))

    def finish(self, report: dict | None = None) -> None:
        for name in sorted(self.writer.pending):
            self.writer.put(name, self.read(name))
        self.writer.close()
        config = {**self.config, "quantization_config": self.q}
        (self.directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if self.q["quant_method"] == "awq":
            (self.directory / "quant_config.json").write_text(json.dumps(_autoawq_config(self.q), indent=2))
        else:
            (self.directory / "quantize_config.json").write_text(json.dumps(self.q, indent=2))
        if report is not None:
            (self.directory / "quant_report.json").write_text(json.dumps(report, indent=2))
        for name in COPIED:
            if (Path(self.source_dir) / name).is_file():
                shutil.copy2(Path(self.source_dir) / name, self.directory / name)

    def abort(self) -> None:
        self.writer.abort()


def save_quantized(out_dir: Path, model: torch.nn.Module, quantized: dict[str, QuantizedWeight], source_dir: Path,
                   quantization_config: dict, force: bool = False, max_shard_size: str | int = "4GB",
                   report: dict | None = None) -> Path:
    """Write an in-memory model with its `quantized` linears packed in the layout `quantization_config` names
    (gptq or awq), atomically (see atomic.py); `report` (per-linear solver figures) goes beside the weights as
    quant_report.json. The same writer as a streamed run, fed all at once."""
    state = unique_state(model)
    with atomic_directory(Path(out_dir), force) as tmp:
        sink = HFSink(tmp, state, list(quantized), quantization_config, model.config.to_dict(), source_dir,
                      lambda name: state[name].detach(), max_shard_size)
        sink.write_block(0, quantized, {})
        sink.finish(report)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- reading

def read_quantization_config(path: Path) -> dict:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {Path(path) / 'config.json'}: {err}") from None
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        raise UserError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    method = q.get("quant_method")
    if method not in PACKED:
        raise UserError(f"{path}: quant_method '{method}' is not readable here (supported: gptq, awq)")
    if method == "gptq" and q.get("checkpoint_format", "gptq") not in ZERO_OFFSETS:
        raise UserError(f"{path}: checkpoint_format '{q['checkpoint_format']}' is not supported "
                        f"({', '.join(ZERO_OFFSETS)})")
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise UserError(f"{path}: awq version '{q['version']}' is not supported (gemm)")
    bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
    if (bits not in (SUPPORTED_BITS if method == "gptq" else (4,)) or not isinstance(group, int)
            or not (group == -1 or group > 0)):
        raise UserError(f"{path}: unsupported {method} quantization_config bits={bits} group_size={group}")
    sym = q.get("sym", q.get("meta", {}).get("sym", False)) if method == "awq" else q.get("sym", True)
    _check_dynamic(path, q.get("dynamic"), method)
    return {**q, "bits": bits, "group_size": group, "sym": sym, "checkpoint_format": q.get("checkpoint_format", "gptq")}


def _check_dynamic(path: Path, dynamic, method: str) -> None:
    """Per-module overrides a reader can act on: compilable patterns, and bits and group sizes it stores."""
    if dynamic is None:
        return
    if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
        raise UserError(f"{path}: quantization_config.dynamic must map patterns to settings")
    for key, value in dynamic.items():
        try:
            re.compile(key.removeprefix("-:").removeprefix("+:"))
        except re.error as err:
            raise UserError(f"{path}: quantization_config.dynamic key {key!r} is not a pattern: {err}") from None
        if key.startswith("-:"):
            continue
        bits, group = value.get("bits"), value.get("group_size")
        if method == "awq" and value:
            raise UserError(f"{path}: per-module settings in an awq checkpoint ({key}) are not readable here")
        if bits is not None and bits not in SUPPORTED_BITS or group is not None and not (
                isinstance(group, int) and (group == -1 or group > 0)):
            raise UserError(f"{path}: quantization_config.dynamic gives {key} bits={bits} group_size={group}")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint (from its index when sharded), checked to lie inside it."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise UserError(f"cannot read {index}: {err}") from None
    else:
        names = [p.name for p in sorted(path.glob("*.safetensors"))]
    files = [path / n for n in names]
    if not files:
        raise UserError(f"no .safetensors weights in {path}")
    for f in files:
        if f.resolve().parent != path.resolve() or not f.is_file():
            raise UserError(f"{path}: weight file '{f.name}' is missing or outside the checkpoint")
    return files


def _expected_shapes(in_f: int, out_f: int, bits: int, group_size: int,
                     method: str = "gptq") -> dict[str, tuple[int, ...]]:
    groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
    if method == "awq":
        return {"qweight": (in_f, out_f * bits // 32), "qzeros": (groups, out_f * bits // 32),
                "scales": (groups, out_f)}
    return {"qweight": (in_f * bits // 32, out_f), "qzeros": (groups, out_f * bits // 32),
            "scales": (groups, out_f), "g_idx": (in_f,)}


def packed_bytes(in_f: int, out_f: int, bits: int, group_size: int, method: str = "gptq") -> int:
    """The bytes a packed linear takes on disk (its bias aside)."""
    return sum(math.prod(shape) * FIELD_DTYPES[field].itemsize
               for field, shape in _expected_shapes(in_f, out_f, bits, group_size, method).items())


def _zero_offset(q: dict) -> int:
    """What QuantLinear's qzeros lack: the checkpoint's convention for gptq; awq stores raw zeros, which the
    v2 convention holds exactly (v1 cannot hold a zero of 0)."""
    return ZERO_OFFSETS[q["checkpoint_format"]] if q["quant_method"] == "gptq" else ZERO_OFFSETS["gptq_v2"]


def load_quantized(path: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A transformers model whose quantized linears are QuantLinear modules holding the packed tensors."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.adapters import ADAPTERS

    path = Path(path)
    q = read_quantization_config(path)
    method = q["quant_method"]
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype or torch.float32)
    adapter = ADAPTERS.get(config.model_type)
    if adapter is not None:
        adapter = adapter.prepare(model)  # MoE: one linear per expert projection, as the file names them
    on_disk = tensor_headers(weight_files(path))
    disk_name = {(adapter.from_disk(n) if adapter else n): n for n in on_disk}
    headers = {name: on_disk[disk] for name, disk in disk_name.items()}
    packed = sorted({n.rsplit(".", 1)[0] for n in headers if n.endswith(".qweight")})
    for name in packed:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{path}: packed tensor '{name}.qweight' names no module of this model") from None
        own = module_settings(q, disk_name[f"{name}.qweight"].removesuffix(".qweight"))
        if own is None:
            raise UserError(f"{path}: '{name}' is packed, but quantization_config.dynamic leaves it in float")
        expected = _expected_shapes(linear.in_features, linear.out_features, own["bits"], own["group_size"], method)
        for field, shape in expected.items():
            found = headers[f"{name}.{field}"].shape if f"{name}.{field}" in headers else None
            if found != shape:
                raise UserError(f"{path}: '{name}.{field}' has shape {found}, expected {shape}")
        if method == "awq" and linear.in_features * q["bits"] % 32:
            raise UserError(f"{path}: '{name}' has {linear.in_features} inputs; the gptq-layout QuantLinear "
                            f"that holds awq weights needs a multiple of 8")
        with torch.device("meta"):
            layer = QuantLinear(linear.in_features, linear.out_features, own["bits"], own["group_size"],
                                own["sym"], linear.bias is not None, linear.weight.dtype, _zero_offset(q))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    # awq tensors are repacked into QuantLinear's gptq buffers; their shapes were checked above
    repacked = {f"{n}.{f}" for n in packed for f in PACKED["awq"]} if method == "awq" else set()
    expected = dict(model.state_dict())
    unknown = sorted(set(headers) - set(expected))
    if unknown:
        raise UserError(f"{path}: tensor '{unknown[0]}' belongs to no module of this model")
    for name, info in headers.items():
        if name not in repacked and tuple(expected[name].shape) != info.shape:
            raise UserError(f"{path}: '{name}' has shape {info.shape}, expected {tuple(expected[name].shape)}")
    awq_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in headers.items():
        value = _read_owned(info.file, disk_name[name])
        require_finite(value, info.file, disk_name[name])
        if name in repacked:
            module, _, field = name.rpartition(".")
            awq_tensors.setdefault(module, {})[field] = value
        else:
            if name.endswith(".g_idx") and name.removesuffix(".g_idx") in packed:
                groups = expected[name.removesuffix("g_idx") + "scales"].shape[0]
                value = _checked_g_idx(path, name, value, groups)
            set_module_tensor_to_device(model, name, device, value=value)
    for module, tensors in awq_tensors.items():  # QuantLinear holds the gptq layout: repacked exactly
        qw = unpack_awq(tensors, q["group_size"], q["sym"])
        for field, value in pack_gptq(qw, _zero_offset(q)).items():
            set_module_tensor_to_device(model, f"{module}.{field}", device, value=value)
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise UserError(f"{path}: checkpoint lacks tensor '{missing[0]}'")
    model.config.quantization_config = q
    return model.to(device).eval()


def _read_owned(file: Path, name: str) -> torch.Tensor:
    """One tensor copied out of its file. safetensors hands out views of a memory map of the whole file:
    a tensor kept from it keeps the map, and every page once read stays resident (1B shape: 1 GB more)."""
    with safe_open(file, "pt") as handle:
        return handle.get_tensor(name).clone()


def _checked_g_idx(path: Path, name: str, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """g_idx indexes the scales in every kernel: a value out of range would read past them."""
    if g_idx.is_floating_point() or g_idx.is_complex() or g_idx.dtype == torch.bool:
        raise UserError(f"{path}: '{name}' is {g_idx.dtype}, expected an integer tensor")
    bad = g_idx[(g_idx < 0) | (g_idx >= groups)]
    if bad.numel():
        raise UserError(f"{path}: '{name}' names group {int(bad[0])}, but the linear has {groups} groups")
    return g_idx.to(torch.int32)


def describe(path: Path) -> dict:
    """Summary for `llmquant inspect`: settings, sizes, bits per quantized weight."""
    q = read_quantization_config(path)
    method = q["quant_method"]
    files = weight_files(path)
    headers = tensor_headers(files)
    quant_bytes = weights = 0
    shapes, settings = set(), {}
    for name in sorted({n.rsplit(".", 1)[0] for n in headers if n.endswith(".qweight")}):
        fields = [headers.get(f"{name}.{field}") for field in PACKED[method]]
        if None in fields:
            missing = PACKED[method][fields.index(None)]
            raise UserError(f"{path}: '{name}.qweight' has no '{name}.{missing}'")
        quant_bytes += sum(math.prod(t.shape) * (2 if t.dtype in ("F16", "BF16") else 4) for t in fields)
        in_f = fields[0].shape[0] if method == "awq" else fields[3].shape[0]
        out_f = fields[2].shape[1] if len(fields[2].shape) == 2 else 0
        own = module_settings(q, name) or q
        for field, shape in _expected_shapes(in_f, out_f, own["bits"], own["group_size"], method).items():
            if headers[f"{name}.{field}"].shape != shape:  # what `load` would refuse, inspect refuses too
                raise UserError(f"{path}: '{name}.{field}' has shape {list(headers[f'{name}.{field}'].shape)}, "
                                f"but quantization_config ({own['bits']} bits, group {own['group_size']}) gives "
                                f"{list(shape)}")
        weights += in_f * out_f
        settings[name] = {"bits": own["bits"], "group_size": own["group_size"],
                          "bytes": packed_bytes(in_f, out_f, own["bits"], own["group_size"], method)}
        shapes.add((in_f, out_f))
    packed = {f"{n.rsplit('.', 1)[0]}.{field}" for n in headers if n.endswith(".qweight") for field in PACKED[method]}
    params = weights + sum(math.prod(t.shape) for n, t in headers.items() if n not in packed)
    size = sum(f.stat().st_size for f in files)
    return {
        "path": str(path), "quant_method": q["quant_method"], "bits": q["bits"], "group_size": q["group_size"],
        "sym": q.get("sym"), "desc_act": q.get("desc_act"), "static_groups": q.get("static_groups"),
        "checkpoint_format": q["checkpoint_format"] if method == "gptq" else None, "files": len(files),
        "size_bytes": size, "tensors": len(headers),
        "quantized_linears": sum(n.endswith(".qweight") for n in headers), "quantized_weights": weights,
        "bpw": 8 * quant_bytes / weights if weights else None, "parameters": params,
        "bits_per_parameter": 8 * size / params if params else None, "meta": q.get("meta", {}),
        "serving": [r.to_dict() for r in runtimes(q, sorted(shapes))],
        "mixed": _settings_summary(settings),
        "layers": _with_costs(path, settings),
    }


def _settings_summary(settings: dict[str, dict]) -> str | None:
    """'W3 g128 x103, W4 g128 x39, ...': the per-layer settings of a mixed-precision checkpoint; None if uniform."""
    counts = Counter(f"W{v['bits']} g{v['group_size']}" for v in settings.values())
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common()) if len(counts) > 1 else None


def _with_costs(path: Path, settings: dict[str, dict]) -> dict[str, dict]:
    """Per packed linear: its settings, and from quant_report.json (when the run allocated bits) the predicted
    cost of its setting and the solver's estimate of the cost of what it wrote (numerics/kld.py)."""
    try:
        report = json.loads((Path(path) / "quant_report.json").read_text())
    except (OSError, ValueError):
        return settings
    if not isinstance(report, dict):
        return settings
    solved, allocated = report.get("linears") or {}, (report.get("allocation") or {}).get("linears") or {}
    for name, layer in settings.items():
        for source, key in ((allocated, "predicted_kld"), (solved, "kld_estimate")):
            value = source.get(name, {}).get(key) if isinstance(source.get(name), dict) else None
            if isinstance(value, (int, float)):
                layer[key] = value
    return settings
