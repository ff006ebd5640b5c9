import pathlib
import sys

sys.path[:0] = [str(pathlib.Path(__file__).parent), str(pathlib.Path(__file__).parent.parent)]

import pytest  # noqa: E402

# The CPU's default precision is bf16 where it computes bf16 natively (AMX, AVX512-BF16; pipeline.py
# default_precision); the tests compare CPU images with fp32 references, so their default stays the
# fp32 one (autocast: fp32 weights on the CPU), in this process and the CLIs and servers it starts.
# Tests of the bf16 default take this away (tests/test_fp8.py).
import os  # noqa: E402

os.environ.setdefault("OPTIMIZEDSD_CPU_PRECISION", "autocast")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny SD v1 checkpoint in the original layout plus its YAML config: (ckpt, yaml, cfg, state dict)."""
    from checkpoints import write_tiny_checkpoint
    from reference import write_yaml_config

    from optimizedSD.model.config import tiny_config

    d = tmp_path_factory.mktemp("tiny_model")
    cfg = tiny_config()
    state = write_tiny_checkpoint(d / "tiny.ckpt", cfg, seed=0)
    return d / "tiny.ckpt", write_yaml_config(cfg, d / "tiny.yaml"), cfg, state


@pytest.fixture(scope="session")
def random_model(tmp_path_factory):
    """A tiny model whose every weight is random, as a real .ckpt (`reference.random_tiny_model`); its
    state dict is shared: tests must not change it."""
    from reference import random_tiny_model

    return random_tiny_model(tmp_path_factory)


@pytest.fixture(scope="session")
def oracle():
    """OpenAI's own SimpleTokenizer (the openai-clip package), the tokenizer tests' oracle."""
    from reference import openai_simple_tokenizer

    return openai_simple_tokenizer()


@pytest.fixture(scope="session")
def tok():
    from optimizedSD.model.tokenizer import ClipTokenizer

    return ClipTokenizer()
