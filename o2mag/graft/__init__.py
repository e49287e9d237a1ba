"""Attention grafting as real diffusers attention processors.

* :class:`AttentionGraft` (``controller``) holds what one tri-branch batch grafts with -- config,
  batch layout, masks, the current step -- and installs the processors;
* ``processors`` -- :class:`GraftSelfAttnProcessor` (TriAG and the Q graft through
  :func:`o2mag_kernels.tri_source_attention`) and :class:`GraftCrossAttnProcessor` (DAE); idle
  calls go to the layer's original processor;
* ``pyramid`` -- the masks at every attention resolution, built once;
* ``source_cache`` -- :class:`SourceCache`, the sources' K/V recorded once and replayed;
* ``attention`` -- diffusers' ``AttnProcessor2_0`` steps around the attention;
* ``unet_layers`` -- the transformer blocks of a UNet in execution order.
"""
from .controller import AttentionGraft
from .processors import GraftCrossAttnProcessor, GraftSelfAttnProcessor
from .pyramid import LayerMasks, MaskPyramid
from .source_cache import QGRAFT_KEYS, SOURCE_KEYS, SourceCache
from .unet_layers import LayerInfo, transformer_layers

__all__ = ["AttentionGraft", "GraftSelfAttnProcessor", "GraftCrossAttnProcessor", "SourceCache",
           "LayerMasks", "MaskPyramid", "LayerInfo", "transformer_layers", "SOURCE_KEYS",
           "QGRAFT_KEYS"]
