"""What a quantization run is asked for (`QuantConfig`, with each setting's default and the checks made
before any work) and what it reports (`QuantReport`)."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, fields

import torch

from .errors import UserError
from .numerics.grid import SUPPORTED_BITS, QuantSpec

METHODS = ("rtn", "gptq", "awq", "awq+gptq", "imatrix")
AWQ_JUDGES = {"rtn": "rtn", "gptq": "inner", "block": "block"}  # --awq-search -> AWQSolver's judge


@dataclass
class QuantConfig:
    # defaults give what one would publish: GPTQ (act-order, static groups, range search), W4 g128 sym, which
    # vLLM's Marlin kernels and every GPTQ runtime take, on 128 x 512 calibration tokens
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    clip: str | None = None  # None: the method's default, see clip_mode
    format: str = "gptq"
    checkpoint_format: str = "gptq"  # --format gptq: gptq (v1, stores zero - 1) or gptq_v2 (stores the zero)
    calib: str | None = None  # None: the default recipe, or `self` when the Hub is unreachable; rtn needs none
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    max_memory: str | None = None  # host memory the run may hold, e.g. "2GB"; None: 80% of what is available
    allow_float: bool = False  # go ahead even if the format must leave many linears in float
    # GPTQ (act_order, static_groups: None = the method's default, see gptq_order)
    act_order: bool | None = None
    static_groups: bool | None = None
    damp: float = 0.01
    block_size: int = 128
    float_targets: bool = False  # fit each linear to the float model's outputs on the float model's inputs
    refit_scales: bool = True  # after the column updates, the least-squares scales for the codes chosen
    tune_iters: int = 0  # steps of block-wise tuning of the rounding after GPTQ (0: none; see quant/tune.py)
    tune_samples: int = 4  # calibration samples per tuning step
    # mixtures of experts: an expert routed fewer calibration tokens is observed on every token
    expert_min_tokens: int | None = None  # None: as many as its linears have inputs (a full-rank Hessian)
    # AWQ
    duo_scaling: bool = True  # candidate scales mean|x|^a / mean|w|^(1-a), not mean|x|^a alone
    awq_clip: bool | None = None  # clip each group after the scales; None: the method's default, see awq_clip_mode
    awq_search: str | None = None  # judge of the scale candidates, rtn | gptq | block; None: see awq_search_mode
    # mixed precision: each linear's setting chosen for the least predicted loss at this many bits per
    # quantized weight (see allocation.py); None: every linear takes --bits/--group-size (or the GGUF mix)
    target_bpw: float | None = None
    # GGUF
    gguf_type: str = "Q4_K_M"  # llama.cpp mix name
    tensor_types: list[str] = field(default_factory=list)  # PATTERN=TYPE overrides

    def validate(self) -> None:
        """The settings every run checks before any work; the format then checks its own."""
        from .formats.registry import format_for

        fmt = format_for(self.format)
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"the {self.format} format stores {', '.join(map(str, SUPPORTED_BITS))} bits, "
                            f"not {self.bits}")
        if self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise UserError(f"--checkpoint-format must be gptq or gptq_v2, not {self.checkpoint_format}")
        if self.checkpoint_format != "gptq" and self.format != "gptq":
            raise UserError("--checkpoint-format belongs to --format gptq")
        if self.group_size != -1 and self.group_size < 1:
            raise UserError(f"group size must be positive or -1 (per channel), not {self.group_size}")
        if not 1 <= self.n_samples <= 4096:
            raise UserError(f"--n-samples must be between 1 and 4096, not {self.n_samples}")
        if self.seqlen < 1:
            raise UserError(f"--seqlen must be positive, not {self.seqlen}")
        if self.clip not in (None, "minmax", "mse"):
            raise UserError(f"--clip must be minmax or mse, not {self.clip}")
        if self.method not in ("gptq", "awq+gptq") and (self.act_order or self.static_groups):
            raise UserError("--act-order and --static-groups belong to --method gptq or awq+gptq")
        if self.float_targets and not self.method.endswith("gptq"):
            raise UserError("--float-targets belongs to --method gptq or awq+gptq")
        if self.expert_min_tokens is not None and self.expert_min_tokens < 0:
            raise UserError("--expert-min-tokens must be 0 or more")
        if self.tune_iters < 0 or self.tune_samples < 1:
            raise UserError("--tune-iters must be 0 or more and --tune-samples 1 or more")
        if self.tune_iters and not self._gptq_on_grid():
            raise UserError("--tune-iters tunes GPTQ's rounding on the integer grid: use it with --method gptq or "
                            "awq+gptq and --format gptq or awq")
        if self.awq_clip is not None and not self.method.startswith("awq"):
            raise UserError("--awq-clip and --no-awq-clip belong to --method awq or awq+gptq")
        if self.awq_search not in (None, *AWQ_JUDGES):
            raise UserError(f"--awq-search must be rtn, gptq or block, not {self.awq_search}")
        if self.awq_search is not None and not self.method.startswith("awq"):
            raise UserError("--awq-search belongs to --method awq or awq+gptq")
        if self.awq_search == "gptq" and not (self.method == "awq+gptq" and self._gptq_on_grid()):
            raise UserError("--awq-search gptq judges scales by the GPTQ that follows: it needs --method awq+gptq "
                            "and --format gptq or awq")
        if self.target_bpw is not None:
            if not 0 < self.target_bpw <= 32:
                raise UserError(f"--target-bpw must be a number of bits per weight, not {self.target_bpw}")
            if self.format == "awq":
                raise UserError("--target-bpw gives linears different bits and group sizes, which the awq (GEMM) "
                                "layout cannot describe; use --format gptq (any --method) or gguf")
            if self.tensor_types:
                raise UserError("--tensor-type fixes tensors' types and --target-bpw chooses them: use one")
        if not 0 < self.damp <= 1:
            raise UserError(f"--damp must be in (0, 1], not {self.damp}")
        if self.block_size < 1:
            raise UserError(f"--block-size must be positive, not {self.block_size}")
        check_device(self.device)
        if self.max_memory is not None:
            from .memory import parse_size

            parse_size(self.max_memory)
        fmt.validate(self)

    def gptq_order(self) -> tuple[bool, bool]:
        """(act_order, static_groups) as the GPTQ solver runs. Unset, both are on for the integer grid: on the
        demo at W3 g128 asym act-order cut KLD from 1.13 to 0.94, and static groups (parameters fitted
        before the permutation) to 0.81, while keeping g_idx = i // group_size, which kernels read fastest."""
        act_order = self._gptq_on_grid() if self.act_order is None else self.act_order
        return act_order, act_order if self.static_groups is None else self.static_groups

    def clip_mode(self) -> str:
        """--clip as the grid runs. Unset, mse for GPTQ: on the demo the range search weighted by the Hessian
        diagonal cut KLD by 31-54% at W4/W3 g128 (sym and asym) and W2 g64, and adds ~10 s to a ~4 min run."""
        if self.clip is not None:
            return self.clip
        return "mse" if self._gptq_on_grid() else "minmax"

    def _gptq_on_grid(self) -> bool:
        """GPTQ (or AWQ+GPTQ) rounding onto the integer grid, not onto GGUF blocks."""
        return self.method.endswith("gptq") and self.format != "gguf"

    def awq_clip_mode(self) -> bool:
        """--awq-clip as AWQ runs. Unset, on for awq (its RTN keeps each group's full range) and off for
        awq+gptq: clipping before GPTQ throws away what GPTQ's own range search and updates would use
        (demo, W3 g128 asym, KLD 0.65 with it, 0.47 without)."""
        return self.method == "awq" if self.awq_clip is None else self.awq_clip

    def awq_search_mode(self) -> str:
        """--awq-search as AWQ runs. Unset, block for awq: the whole block's output, as AWQ intends, and the
        one judge whose choices hold across CPUs (demo, W4 g64 asym: KLD 0.148 on two machines, where the
        linear-output judge gave 0.145 on one and 0.151 on another), for about twice the time. gptq for
        awq+gptq on the integer grid: RTN's error picks scales too strong for GPTQ, which corrects much of
        what scaling is for (W3 g128 asym: KLD 0.469 to 0.412, plain GPTQ 0.454; W4 0.121 to 0.120, 0.130),
        for a GPTQ solve per candidate (about five per group); rtn for awq+gptq onto GGUF blocks."""
        if self.awq_search is not None:
            return self.awq_search
        if self.method == "awq":
            return "block"
        return "gptq" if self._gptq_on_grid() else "rtn"

    def as_command(self, model: str) -> str:
        """The `llmquant quantize` command that asks for this run: the method, grid, format and calibration
        always (defaults move between versions), every other setting where it is not its default. Where the
        run happens (--device, --max-memory) does not change what it writes and is left out."""
        default, calibrated = QuantConfig(), self.method != "rtn"
        always = {"method", "format", *(("gguf_type",) if self.format == "gguf" else ("bits", "group_size", "sym")),
                  *(("calib", "n_samples", "seqlen", "seed") if calibrated else ())}
        args = ["llmquant", "quantize", model]
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name in ("device", "max_memory") or value is None
                    or (f.name not in always and value == getattr(default, f.name))):
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.name == "sym":
                args.append("--sym" if value else "--asym")
            elif f.name == "duo_scaling":
                args.append("--no-duo-scaling")
            elif f.name == "tensor_types":
                args += [a for pattern in value for a in ("--tensor-type", pattern)]
            elif isinstance(value, bool):
                args.append(flag if value else f"--no-{flag[2:]}")
            else:
                args += [flag, str(value)]
        return shlex.join([*args, "--out", "OUT"])

    def spec(self) -> QuantSpec:
        # the gptq (v1) layout stores zero - 1, so an asymmetric zero of 0 cannot be written (gptq_v2 can); the
        # other formats keep v1's grid, on which their outputs were compared with peers'
        v1 = self.checkpoint_format == "gptq"
        return QuantSpec(self.bits, self.group_size, self.sym, self.clip_mode(), min_zero=1 if v1 and not self.sym else 0)


@dataclass
class QuantReport:
    out: str
    method: str
    bits: int
    group_size: int
    sym: bool
    seconds: float
    size_bytes: int
    bpw: float
    quantized_linears: int
    skipped: list[str] = field(default_factory=list)
    gguf_types: dict[str, str] | None = None  # GGUF: tensor name -> block type
    peak_gpu_bytes: int | None = None  # --device cuda: the most GPU memory torch held at once
    bits_per_parameter: float | None = None  # the whole output's size over all the model's parameters
    allocation: dict | None = None  # --target-bpw: each unit's setting, bytes and predicted cost (Allocation.to_dict)

    def to_dict(self) -> dict:
        return asdict(self)


def check_device(device: str) -> None:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda, not {device}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")


