"""Shared tiny models for the o2mag tests (built once per session: they are read-only in tests)."""
import pytest

from o2mag.sources import tiny


@pytest.fixture(scope="session")
def tiny_unet():
    return tiny.tiny_unet(seed=0)


@pytest.fixture(scope="session")
def tiny_unet_hd64():
    """SD 2.x-like variant: head dim 64 everywhere (64/128 channels, 1/2 heads)."""
    return tiny.tiny_unet(seed=1, block_out_channels=(64, 128, 128, 128), attention_head_dim=(1, 2, 2, 2))



@pytest.fixture(scope="module")
def pipe():
    """A quiet tiny O2MAGPipeline, one per test module (modules fill its caches differently)."""
    from o2mag.pipeline import O2MAGPipeline

    p = O2MAGPipeline.tiny(0)
    p.progress = False
    return p
