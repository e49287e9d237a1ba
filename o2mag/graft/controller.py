"""AttentionGraft: the state one tri-branch batch layout grafts with, and its installation."""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Optional, Tuple

import torch

from ..checks import is_int
from ..method.config import GraftConfig, StepPlan
from ..method.layout import BranchLayout
from .processors import GraftCrossAttnProcessor, GraftSelfAttnProcessor
from .pyramid import LayerMasks, MaskPyramid, as_mask
from .source_cache import SourceCache
from .unet_layers import transformer_layers


class AttentionGraft:
    """Drives the grafting processors of one tri-branch batch layout.

    >>> graft = AttentionGraft(GraftConfig.paper(), BranchLayout(num_targets=4))
    >>> graft.set_masks(ref_mask, target_masks)
    >>> with graft.installed(unet):
    ...     for i, t in enumerate(timesteps):
    ...         graft.set_step(i, len(timesteps))
    ...         eps = unet(latents, t, encoder_hidden_states=emb).sample

    One-to-more with a :class:`SourceCache`: run the first batch with
    ``BranchLayout(n, include_sources=True)`` and ``AttentionGraft(cfg, layout, cache)`` -- the
    processors record the reference/normal K/V (and Q in the Q-graft phase) wherever grafting is
    active; run later batches with ``layout.for_replay(m)`` (target rows only) and the same cache,
    config and number of steps -- the processors read the sources back instead of recomputing them.
    """

    def __init__(self, config: GraftConfig, layout: BranchLayout, source_cache: Optional[SourceCache] = None):
        if not isinstance(config, GraftConfig):
            raise TypeError(f"config must be a GraftConfig, got {type(config).__name__}")
        if not isinstance(layout, BranchLayout):
            raise TypeError(f"layout must be a BranchLayout, got {type(layout).__name__}")
        if source_cache is not None and not isinstance(source_cache, SourceCache):
            raise TypeError(f"source_cache must be a SourceCache or None, got {type(source_cache).__name__}")
        if not layout.include_sources and source_cache is None:
            raise ValueError("layout has no source rows (include_sources=False): a source_cache to "
                             "replay from is required")
        self.config = config
        self.layout = layout
        self.source_cache = source_cache
        self.pyramid: Optional[MaskPyramid] = None
        self.dae_bias: Dict[tuple, torch.Tensor] = {}
        self._plan: Optional[StepPlan] = None
        self._tokens: Tuple[int, ...] = ()
        self._unet = None

    # ---- inputs --------------------------------------------------------------------------------
    def set_masks(self, ref_mask, target_masks) -> None:
        """Reference mask M_R (H, W) and target masks M_T (N, H, W): bool, 0/1 integer, or float in
        [0, 1] (thresholded at 0.5), in image or latent space. Per-resolution masks are built
        lazily (or by :meth:`prepare`), once per layer size, and cached until the next call."""
        ref = as_mask("ref_mask", ref_mask, 2)
        tgt = as_mask("target_masks", target_masks, 3)
        if tgt.shape[0] != self.layout.num_targets:
            raise ValueError(f"target_masks holds {tgt.shape[0]} masks but the layout has "
                             f"{self.layout.num_targets} targets")
        self.pyramid = MaskPyramid(ref, tgt, self.config)
        self.dae_bias = {}

    def set_step(self, step: int, num_steps: int) -> None:
        """Select the phases of denoising step ``step`` (0-based) of ``num_steps``."""
        self._plan = self.config.plan(step, num_steps)

    def set_token_indices(self, indices: Iterable[int]) -> None:
        """Prompt token positions of the anomaly word(s) that DAE amplifies (empty: DAE off)."""
        if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
            raise ValueError(f"indices must be a sequence of ints, got {indices!r}")
        out = []
        for i in indices:
            i = int(i) if isinstance(i, torch.Tensor) else i
            if not is_int(i) or i < 0:
                raise ValueError(f"indices must hold non-negative ints, got {i!r}")
            out.append(int(i))
        self._tokens = tuple(sorted(set(out)))
        self.dae_bias = {}

    @property
    def plan(self) -> Optional[StepPlan]:
        return self._plan

    @property
    def token_indices(self) -> Tuple[int, ...]:
        return self._tokens

    def prepare(self, latent_size: Tuple[int, int], device, levels: Optional[int] = None, *,
                dtype: Optional[torch.dtype] = None, text_len: int = 77) -> None:
        """Build the masks of every attention resolution of a ``latent_size`` (h, w) latent now:
        the UNet halves it ``levels - 1`` times (default: its number of down blocks when installed,
        else 4, as in SD). With ``dtype`` (the UNet's), DAE's logit biases for ``text_len`` text
        tokens are built too. Optional -- everything is otherwise built at first use -- but it
        keeps all mask building out of a ``torch.compile``-d UNet call, which then compiles once
        per phase (Q graft, TriAG, TriAG + DAE) instead of again when a cache fills."""
        self._needs_masks()
        if levels is None:
            levels = len(getattr(self._unet, "down_blocks", ()) or ()) or 4
        device = torch.device(device)
        h, w = latent_size
        sizes = [(-(-h // 2 ** k), -(-w // 2 ** k)) for k in range(levels)]
        self.pyramid.prepare(sizes, device)
        if dtype is not None and self._tokens:
            for hw in sizes:
                self.dae_logit_bias(hw[0] * hw[1], hw, text_len, dtype, device)

    def dae_logit_bias(self, length: int, hw, text_len: int, dtype, device) -> torch.Tensor:
        """(N, 1, L, T) additive logit bias of DAE: log(gain) on the anomaly tokens of queries
        inside M_T. Multiplying probabilities by the gain and renormalising is the same as adding
        log(gain) to those logits, which cannot overflow fp16. Built once per layer size."""
        key = (self.pyramid.grid(length, hw), text_len, dtype, str(device))
        bias = self.dae_bias.get(key)
        if bias is None:
            inside = self.pyramid.mask("tgt", self.config.dae_mask_mode, length, hw, device)
            col = torch.zeros(text_len, dtype=torch.bool, device=device)
            col[list(self._tokens)] = True
            bias = (inside[:, None, :, None] & col).to(dtype) * math.log(self.config.dae_gain)
            self.dae_bias[key] = bias
        return bias

    # ---- installation --------------------------------------------------------------------------
    def touched_layers(self, layers):
        """(self-attention layers, cross-attention layers) the config can ever activate."""
        cfg = self.config
        selfs, crosses = [], []
        for info in layers:
            grafted = cfg.graft_steps is not None and (
                info.index in cfg.graft_layers or info.self_name in cfg.graft_layer_names)
            qgrafted = cfg.qgraft_steps is not None and info.index in cfg.qgraft_layers
            if grafted or qgrafted:
                selfs.append(info)
            if (info.cross_name is not None and cfg.dae_steps is not None and cfg.dae_gain != 1.0
                    and info.index in cfg.dae_layers):
                crosses.append(info)
        return selfs, crosses

    @contextlib.contextmanager
    def installed(self, unet):
        """Install grafting processors (``set_attn_processor``) on the layers the config touches --
        each wraps the layer's original processor and hands it every call it does not graft --
        and restore the original processors on exit, also when the body raises."""
        if self._unet is not None:
            raise RuntimeError("this AttentionGraft is already installed on a UNet")
        layers = transformer_layers(unet)
        cfg = self.config
        for field in ("graft_layers", "qgraft_layers", "dae_layers"):
            bad = [i for i in getattr(cfg, field) if i >= len(layers)]
            if bad:
                raise ValueError(f"config.{field} has indices {bad} but the UNet has only "
                                 f"{len(layers)} transformer blocks")
        known = {info.self_name for info in layers}
        unknown = [n for n in cfg.graft_layer_names if n not in known]
        if unknown:
            raise ValueError(f"config.graft_layer_names {unknown} are not self-attention processors of "
                             f"this UNet")
        originals = dict(unet.attn_processors)
        procs = dict(originals)
        selfs, crosses = self.touched_layers(layers)
        for info in selfs:
            procs[info.self_name] = GraftSelfAttnProcessor(self, info.index, info.self_name,
                                                           originals[info.self_name])
        for info in crosses:
            procs[info.cross_name] = GraftCrossAttnProcessor(self, info.index, info.cross_name,
                                                             originals[info.cross_name])
        if selfs or crosses:
            unet.set_attn_processor(procs)
        self._unet = unet
        try:
            yield self
        finally:
            if selfs or crosses:
                unet.set_attn_processor(dict(originals))
            self._unet = None

    # ---- what the processors ask -----------------------------------------------------------------
    def _needs_plan(self) -> None:
        if self._plan is None:
            raise RuntimeError("call graft.set_step(i, num_steps) before running the UNet")

    def _needs_masks(self) -> None:
        if self.pyramid is None:
            raise RuntimeError("call graft.set_masks(ref_mask, target_masks) before running the UNet")

    def self_mode(self, index: int, name: str) -> Optional[str]:
        """'qgraft', 'graft' or None (the original processor) for a self-attention layer now."""
        if self._plan is None:
            self._needs_plan()
        return self.config.self_mode(self._plan, index, name)

    def dae_on(self, index: int) -> bool:
        """Whether DAE runs on the cross-attention of layer ``index`` now."""
        if self._plan is None:
            self._needs_plan()
        return bool(self._tokens) and self.config.dae_on(self._plan, index)

    def check_batch(self, batch: int, name: str) -> None:
        if batch != self.layout.batch_size:
            raise RuntimeError(f"{name}: the UNet batch has {batch} rows but {self.layout!r} needs "
                               f"{self.layout.batch_size}; assemble latents with the layout")
        self._needs_masks()

    def layer_masks(self, mode: str, length: int, device, hw=None) -> LayerMasks:
        """The masks a self-attention layer with ``length`` tokens uses in ``mode``
        ('graft' or 'qgraft'); built once per resolution (see :class:`MaskPyramid`)."""
        self._needs_masks()
        return self.pyramid.layer(mode, length, device, hw)

    def stitch_masks(self, size: Tuple[int, int], device) -> torch.Tensor:
        """M_T at latent ``size`` (h, w) as float 0/1 (N, 1, h, w), downsampled exactly like the
        TriAG query masks (``config.target_mask_mode``: max-pooling in the paper preset), so the
        background blend and the grafting agree on where the defect goes."""
        self._needs_masks()
        return self.pyramid.stitch(size, device)
