"""What a request returns: :class:`O2MAGPipelineOutput` in diffusers' output types, the masks beside
the images, and the pipeline's work counters (:class:`PipelineStats`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

__all__ = ["O2MAGPipelineOutput", "PipelineStats", "postprocess", "mask_image"]


@dataclass
class O2MAGPipelineOutput(BaseOutput):
    """What ``pipe(...)`` returns: one image and one mask per target mask, in target order.

    ``output_type="pil"``: lists of PIL images (RGB; masks mode "L", 0 or 255).
    ``"np"``: float32 arrays in [0, 1], images (N, H, W, 3), masks (N, H, W, 1).
    ``"pt"``: float32 tensors in [0, 1], images (N, 3, H, W), masks (N, 1, H, W).
    ``"latent"``: images are the final latents (N, C, H/8, W/8), not decoded; masks as for "pt".
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    masks: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]


@dataclass
class PipelineStats:
    """Work counters (reset with :meth:`reset`): UNet forward calls and rows, inversions, AGO runs.

    ``generation_unet_calls``/``generation_unet_rows`` count only the denoising loop, so the cost per
    generated sample can be compared between schemes.
    """

    unet_calls: int = 0
    unet_rows: int = 0
    generation_unet_calls: int = 0
    generation_unet_rows: int = 0
    inversion_runs: int = 0
    inversion_cache_hits: int = 0
    ago_runs: int = 0
    ago_cache_hits: int = 0
    samples: int = 0

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def postprocess(latents_or_images: torch.Tensor, masks: List[np.ndarray], output_type: str,
                image_processor: VaeImageProcessor, mask_processor: VaeImageProcessor) -> Tuple:
    """``(images, masks)`` in ``output_type``: decoded images in [-1, 1] (N, 3, H, W) through
    diffusers' image processor, or, for ``"latent"``, the final latents as they are; the bool
    masks as float ``(N, 1, H, W)`` through the mask processor (0/255 ``"L"`` images for ``"pil"``)."""
    mask_t = torch.from_numpy(np.stack(masks)).float()[:, None]
    if output_type == "latent":
        return latents_or_images, mask_t
    return (image_processor.postprocess(latents_or_images, output_type=output_type),
            mask_processor.postprocess(mask_t, output_type=output_type))


def mask_image(mask: np.ndarray, mask_processor: VaeImageProcessor) -> PIL.Image.Image:
    """One bool mask as a 0/255 ``"L"`` image, as ``output_type="pil"`` gives masks."""
    return mask_processor.postprocess(torch.from_numpy(mask).float()[None, None], output_type="pil")[0]
