"""Run diffusers' own pipeline test suite (``PipelineTesterMixin`` and ``PipelineFromPipeTesterMixin``
from a diffusers source checkout's ``tests/pipelines/test_pipelines_common.py``) against
``O2MAGPipeline`` on the tiny seeded components, as a diffusers user would check a pipeline.

diffusers does not ship its tests in the wheel, so point this at a checkout's ``tests`` folder::

    git clone https://github.com/huggingface/diffusers            # any recent version
    pip install parameterized requests-mock                       # what those tests import
    DIFFUSERS_TESTS=diffusers/tests python tools/diffusers_conformance.py [pytest options]

(or ``DIFFUSERS_TESTS=... python -m pytest tools/diffusers_conformance.py``). Without
``DIFFUSERS_TESTS`` every test here is skipped, saying so. Only the mixins are taken from the
checkout; the pipeline, the components and the call's inputs are ours. The mixins' checks are
run unchanged: nothing is overridden, so the summary is what a user running them would see
(README, "diffusers conformance", says which checks do not apply to O2MAG and why).

The call's own parameters are declared (``params``, ``batch_params``, ``required_optional_params``):
O2MAG takes a reference, its mask, a normal image and target masks, not a text-to-image call, so
the target masks are what a batch multiplies, and it has no ``latents`` or
``num_images_per_prompt`` (one image per target mask; the starting noise is the normal image's
inversion).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import unittest

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: o2mag from this checkout

from o2mag import O2MAGPipeline  # noqa: E402
from o2mag.sources.sample import embedded_sample  # noqa: E402
from o2mag.sources.tiny import TINY_IMAGE_SIZE, tiny_components  # noqa: E402

ENV = "DIFFUSERS_TESTS"
PACKAGE = "diffusers_checkout_tests"  # not "tests": this repository has a tests package of its own


def _load_mixins():
    """(PipelineTesterMixin, PipelineFromPipeTesterMixin, why not) from ``$DIFFUSERS_TESTS``."""
    folder = os.environ.get(ENV)
    if not folder:
        return None, None, (f"{ENV} is not set: point it at a diffusers source checkout's tests folder "
                            "(diffusers' wheel does not ship its tests)")
    init = os.path.join(folder, "pipelines", "test_pipelines_common.py")
    if not os.path.isfile(init):
        return None, None, f"{ENV}={folder!r} holds no pipelines/test_pipelines_common.py"
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    try:
        common = importlib.import_module(f"{PACKAGE}.pipelines.test_pipelines_common")
    except ModuleNotFoundError as e:
        raise ImportError(f"diffusers' tests in {folder} import {e.name!r}, which is not installed "
                          "(they need: pip install parameterized requests-mock)") from e
    return common.PipelineTesterMixin, common.PipelineFromPipeTesterMixin, None


PipelineTesterMixin, PipelineFromPipeTesterMixin, WHY_NOT = _load_mixins()
if WHY_NOT:
    def test_diffusers_pipeline_checks():
        pytest.skip(WHY_NOT)

    PipelineTesterMixin = PipelineFromPipeTesterMixin = None


class O2MAGConformanceTests(*[m for m in (PipelineTesterMixin, PipelineFromPipeTesterMixin) if m],
                            unittest.TestCase):
    pipeline_class = O2MAGPipeline
    params = frozenset({"reference", "ref_mask", "normal", "target_masks", "prompt", "anomaly_word",
                        "guidance_scale", "eta", "callback_on_step_end",
                        "callback_on_step_end_tensor_inputs"})
    batch_params = frozenset({"target_masks"})
    required_optional_params = frozenset({"num_inference_steps", "generator", "output_type", "return_dict"})
    callback_cfg_params = frozenset()
    test_xformers_attention = False  # xformers is not a dependency; the mixin needs CUDA for it anyway

    def get_dummy_components(self):
        # every component the pipeline declares, the optional SDXL ones as None (SD 1.x), as
        # diffusers' own SD tests pass safety_checker=None
        return {**tiny_components(0), **{name: None for name in O2MAGPipeline._optional_components}}

    def get_dummy_inputs(self, device, seed=0):
        sample = embedded_sample(TINY_IMAGE_SIZE)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return {
            "reference": sample.reference,
            "ref_mask": sample.ref_mask,
            "normal": sample.normal,
            "target_masks": np.asarray(sample.ref_mask, dtype=bool)[::-1].copy(),  # one target mask
            "prompt": sample.prompt,
            "anomaly_word": sample.anomaly_word,
            "num_inference_steps": 2,
            "guidance_scale": 6.0,
            "ago_steps": 1,
            "generator": generator,
            "output_type": "np",
        }


if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__), "-p", "no:cacheprovider", *sys.argv[1:]]))
