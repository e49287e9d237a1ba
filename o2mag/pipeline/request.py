"""One request to the pipeline, checked and prepared before any model work: every argument checked
(in the order ``pipe(...)`` has always checked them, so the first bad one is the one named), the
settings built (:class:`~.settings.GenerationSettings`), every image and mask read and brought to
the working size, the anomaly word found in the prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ..errors import InputError
from .inputs import prepare_sources, prepare_targets, token_indices
from .settings import GenerationSettings, check_call_options, check_prompt, check_size

__all__ = ["Request", "check_arguments", "prepare_request"]


@dataclass
class Request:
    """One checked and prepared generation request (what ``__call__`` and ``generate_iter`` share):
    the inputs at the working size, the settings and the per-call options."""

    ref: np.ndarray
    m_r: np.ndarray
    nor: np.ndarray
    masks: List[np.ndarray]
    prompt: str
    tokens: List[int]
    settings: GenerationSettings
    generator: Any
    callback: Optional[Callable]
    callback_inputs: Tuple[str, ...]

    def generator_for(self, idx: Sequence[int]):
        """The generator(s) for the targets ``idx`` of one batch: the shared one, or theirs."""
        if isinstance(self.generator, (list, tuple)):
            return [self.generator[k] for k in idx]
        return self.generator


def check_arguments(a: Dict[str, Any], output_type: str, callback_inputs: Sequence[str], *,
                    allowed_callback_inputs: Sequence[str], vae_scale_factor: int,
                    xl: Optional[bool] = None) -> GenerationSettings:
    """The checked settings of a call's arguments ``a`` (all of them, by name); the per-call
    options are checked between the settings' two groups of checks, as they always have been.
    ``xl``: whether the model is SDXL (``ago_pooled`` needs it); None: not known, not checked."""
    check_prompt(a["prompt"], a["anomaly_word"])
    values = {name: a[name] for name in GenerationSettings.names()}
    GenerationSettings.check_numbers(values)
    check_call_options(a["generator"], output_type, a["callback_on_step_end"], callback_inputs,
                       allowed_callback_inputs)
    GenerationSettings.check_choices(values, vae_scale_factor, xl)
    return GenerationSettings(**values)


def prepare_request(a: Dict[str, Any], output_type: str, *, tokenizer, default_size: int, vae_scale_factor: int,
                    allowed_callback_inputs: Sequence[str], tokenizer_2=None) -> Request:
    """Check every argument of a call (``a``: all of them by name) and read every input now.

    SDXL (``tokenizer_2`` given; only then may ``ago_pooled`` be on): the anomaly word is looked
    up in both tokenizers' ids. DAE indexes the concatenated sequence embedding, whose position ``k`` holds both encoders' states
    of token ``k``, so the two lists must be one: they are (both tokenizers are CLIP's BPE, BOS at
    0), and a pair that disagrees is refused rather than amplifying different words."""
    callback, callback_inputs = a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"]
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        callback_inputs = callback.tensor_inputs
    settings = check_arguments(a, output_type, callback_inputs, allowed_callback_inputs=allowed_callback_inputs,
                               vae_scale_factor=vae_scale_factor, xl=tokenizer_2 is not None)
    size = settings.size or default_size
    check_size(size, vae_scale_factor)
    tokens = token_indices(tokenizer, a["prompt"], a["anomaly_word"])
    if tokenizer_2 is not None:
        tokens_2 = token_indices(tokenizer_2, a["prompt"], a["anomaly_word"])
        if tokens_2 != tokens:
            raise InputError(f"anomaly_word {a['anomaly_word']!r} sits at token positions {tokens} for tokenizer "
                             f"but {tokens_2} for tokenizer_2: SDXL's two tokenizers must split the prompt alike")
    ref, m_r, nor = prepare_sources(a["reference"], a["ref_mask"], a["normal"], size)
    masks = prepare_targets(a["target_masks"], size)
    generator = a["generator"]
    if isinstance(generator, (list, tuple)) and len(generator) != len(masks):
        raise ValueError(f"generator holds {len(generator)} generators but there are {len(masks)} target "
                         "masks: give one generator, or one per target mask")
    return Request(ref=ref, m_r=m_r, nor=nor, masks=masks, prompt=a["prompt"], tokens=tokens, settings=settings,
                   generator=generator, callback=callback, callback_inputs=tuple(callback_inputs))
