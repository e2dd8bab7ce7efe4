"""Shared fixtures: the offline default model (converted once into the user cache) and tiny models."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir():
    from afd_ray.models.offline import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from afd_ray.models.loading import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    from afd_ray.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", smollm2_dir, seed=0)
