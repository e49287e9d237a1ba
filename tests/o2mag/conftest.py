"""Shared tiny models and inputs for the o2mag tests (built once per session: read-only in tests)."""
import numpy as np
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


@pytest.fixture(scope="session")
def sample():
    """The embedded sample at the tiny model's size (read-only in tests)."""
    from o2mag.sources.sample import embedded_sample

    from .calls import SIZE

    return embedded_sample(SIZE)


@pytest.fixture(scope="session")
def masks(sample):
    """Three affine copies of the sample's defect mask (seed 1)."""
    from o2mag.masks.targets import affine_masks

    return [t.mask for t in affine_masks(sample.ref_mask, 3, seed=1)]


@pytest.fixture(scope="module")
def xl():
    """The tiny SDXL-shaped pipeline (``O2MAGPipeline.tiny(0, family="sdxl")``), bars off."""
    from o2mag import O2MAGPipeline

    p = O2MAGPipeline.tiny(0, family="sdxl")
    p.progress = False
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def xl_mask():
    """A rectangular target mask at the SDXL tests' 64 px."""
    m = np.zeros((64, 64), dtype=bool)
    m[24:40, 16:40] = True
    return m
