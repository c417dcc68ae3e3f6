"""Shared fixtures. Everything runs offline: open_clip and huggingface_hub must never try the network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU and skips without one (test/test_cuda.py; "
                                       "SPEECHCLIP_TEST_DEVICE=cpu runs it on the CPU; bench/gpu.sh runs them)")


@pytest.fixture(scope="session")
def tiny_clip_config() -> str:
    """Path of the tiny open_clip model config (random init, created in well under a second)."""
    from speechclip_plus.models.tiny import TINY_CLIP_CONFIG

    return TINY_CLIP_CONFIG


@pytest.fixture(scope="session")
def tiny_hubert_ckpt(tmp_path_factory) -> str:
    """A random tiny HuBERT (2 layers, 32-d, 320x downsampling) in s3prl's format, for ``hubert_local``."""
    from speechclip_plus.models.tiny import save_tiny_hubert

    return save_tiny_hubert(tmp_path_factory.mktemp("tiny_hubert") / "tiny_hubert.pt")
