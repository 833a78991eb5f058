"""QuantConfig.as_command: the command a card prints to reproduce a run asks for exactly that run."""

import dataclasses
import shlex

import pytest

from llmquant.cli import build_parser
from llmquant.config import QuantConfig

CONFIGS = [
    QuantConfig(),
    QuantConfig(method="rtn", bits=3, group_size=-1, sym=False),
    QuantConfig(bits=2, group_size=64, sym=False, checkpoint_format="gptq_v2", calib="self", n_samples=16,
                seqlen=256, seed=3, act_order=True, static_groups=False, clip="minmax", damp=0.05, block_size=64,
                float_targets=True, refit_scales=False, tune_iters=4, tune_samples=2, allow_float=True),
    QuantConfig(method="awq+gptq", format="awq", duo_scaling=False, awq_clip=True, awq_search="block",
                expert_min_tokens=0, calib="data.txt"),
    QuantConfig(method="imatrix", format="gguf", gguf_type="Q3_K_M", tensor_types=["attn_v=Q8_0", "ffn_down=Q6_K"],
                calib="my file.txt"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.format}")
def test_the_command_asks_for_the_same_run(config):
    command = config.as_command("org/model")
    argv = shlex.split(command)
    assert argv[:3] == ["llmquant", "quantize", "org/model"] and argv[-2:] == ["--out", "OUT"]
    args = build_parser().parse_args(argv[1:])
    names = {f.name for f in dataclasses.fields(QuantConfig)}
    parsed = QuantConfig(**{k: v for k, v in vars(args).items() if k in names})
    assert parsed == config, command
    assert "--device" not in argv and "--max-memory" not in argv
    if config.method != "rtn":  # the calibration is always spelled out (unset: resolved when the run starts)
        assert ("--calib" in argv) == (config.calib is not None) and "--n-samples" in argv
