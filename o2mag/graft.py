"""Attention grafting as real diffusers attention processors (DESIGN §4).

:class:`AttentionGraft` installs one processor per transformer-block attention of a UNet with
``unet.set_attn_processor`` (keyed by processor name; the execution-order index of every name is
found by walking down/mid/up blocks) and restores the originals on exit. Self-attention
processors graft the target rows onto the reference/normal sources through
:func:`o2mag_kernels.tri_source_attention`; cross-attention processors apply DAE. Whenever a
processor has nothing to do it computes exactly what diffusers' ``AttnProcessor2_0`` computes.

What is active where and when lives in :class:`o2mag.GraftConfig`; the batch order lives in
:class:`o2mag.BranchLayout`; per-resolution mask pyramids are built once and cached here.

One-to-more with a :class:`SourceCache`: run the first batch with
``BranchLayout(n, include_sources=True)`` and ``AttentionGraft(cfg, layout, cache)`` -- the
processors record the reference/normal K/V (and Q in the Q-graft phase) wherever grafting is
active; run later batches with ``layout.for_replay(m)`` (target rows only) and the same cache,
config and number of steps -- the processors read the sources back instead of recomputing them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from o2mag_kernels import tri_source_attention

from .config import GraftConfig, StepPlan
from .layout import BranchLayout

SOURCE_KEYS = ("k_ref", "v_ref", "k_norm", "v_norm")
QGRAFT_KEYS = ("q_ref", "q_norm")


# ------------------------------------------------------------------------------------------------
# UNet structure
# ------------------------------------------------------------------------------------------------
class LayerInfo(NamedTuple):
    """One transformer block: execution-order index and its attention processors' names."""

    index: int
    self_name: str
    cross_name: Optional[str]


def transformer_layers(unet) -> List[LayerInfo]:
    """Transformer blocks of a diffusers UNet in execution order (down, mid, up): for SD 1.x/2.x
    indices 0-5 are down, 6 mid, 7-15 up. Names are the keys of ``unet.attn_processors``."""
    names = {id(m): n for n, m in unet.named_modules()}
    groups = [list(getattr(unet, "down_blocks", []) or []),
              [unet.mid_block] if getattr(unet, "mid_block", None) is not None else [],
              list(getattr(unet, "up_blocks", []) or [])]
    out: List[LayerInfo] = []
    for group in groups:
        for block in group:
            for transformer in getattr(block, "attentions", None) or []:
                for tb in getattr(transformer, "transformer_blocks", None) or []:
                    attn1 = getattr(tb, "attn1", None)
                    if attn1 is None:
                        continue
                    attn2 = getattr(tb, "attn2", None)
                    out.append(LayerInfo(len(out), names[id(attn1)] + ".processor",
                                         None if attn2 is None else names[id(attn2)] + ".processor"))
    return out


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
def _as_mask(name: str, x, ndim: int) -> torch.Tensor:
    """Validate a mask and return it as float32 0/1 on the CPU (True/ >= 0.5 -> 1)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != ndim:
        want = "(H, W)" if ndim == 2 else "(N, H, W)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    x = x.detach().cpu()
    if x.dtype == torch.bool:
        return x.float()
    if x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name} must hold values in [0, 1] (bool or 0/1 float)")
        return (x >= 0.5).float()
    if x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name} integer masks must hold only 0 and 1")
        return x.float()
    raise TypeError(f"{name} must be bool, 0/1 integer or float in [0, 1], got {x.dtype}")


def _grid(length: int, height: int, width: int) -> Tuple[int, int]:
    """The (h, w) grid of a layer with ``length`` tokens for a mask of size (height, width): UNets
    halve with rounding up, so try ceil(size / 2^k) first, then the closest-aspect factor pair."""
    s = 1
    while s <= 2 * max(height, width):
        h, w = -(-height // s), -(-width // s)
        if h * w == length:
            return h, w
        s *= 2
    pairs = [(h, length // h) for h in range(1, length + 1) if length % h == 0]
    aspect = math.log(height / width)
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - aspect))


def _down(mask: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """(N, H, W) float 0/1 -> (N, h*w) bool, by adaptive max pooling or nearest sampling."""
    x = mask[:, None]
    if tuple(mask.shape[-2:]) == tuple(size):
        y = x
    elif mode == "max":
        y = F.adaptive_max_pool2d(x, size)
    else:
        y = F.interpolate(x, size=size, mode="nearest")
    return (y[:, 0] >= 0.5).flatten(1)


class LayerMasks(NamedTuple):
    """Masks of one layer at one resolution, flattened, as tri_source_attention takes them."""

    query: torch.Tensor  # (N, L) bool: target query inside M_T
    fg: torch.Tensor  # (1, L) bool: reference key inside M_R
    bg: Optional[torch.Tensor]  # (N, L) bool: normal key usable (outside M_T) or None
    qsel: Optional[torch.Tensor]  # (N, L) bool: Q-graft phase, take the reference Q


# ------------------------------------------------------------------------------------------------
# source K/V cache
# ------------------------------------------------------------------------------------------------
class SourceCache:
    """Reference/normal K and V (and Q during the Q-graft phase) per (step, processor name).

    The source branches replay their inverted latents, so their attention inputs do not depend on
    the targets: record them once (a full batch, ``BranchLayout(include_sources=True)``) and
    replay them for later batches that hold only target rows (``include_sources=False``). Each
    entry maps ``k_ref, v_ref, k_norm, v_norm`` (and ``q_ref, q_norm``) to a tensor of shape
    (num_halves, heads, tokens, head_dim), CFG halves uncond first. ``device`` (e.g. "cpu") keeps
    the cache off the accelerator; None keeps it where the UNet runs.
    """

    def __init__(self, device=None):
        self.device = None if device is None else torch.device(device)
        self._store: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
        self.num_steps: Optional[int] = None
        self.num_halves: Optional[int] = None

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key) -> bool:
        return key in self._store

    def keys(self) -> List[Tuple[int, str]]:
        return sorted(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.num_steps = self.num_halves = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self._store.values() for t in e.values())

    def _check(self, num_steps: int, num_halves: int, what: str) -> None:
        if self.num_steps is None:
            return
        if (num_steps, num_halves) != (self.num_steps, self.num_halves):
            raise RuntimeError(
                f"SourceCache {what}: it holds a run with num_steps={self.num_steps}, "
                f"num_halves={self.num_halves}, now asked for num_steps={num_steps}, "
                f"num_halves={num_halves}; clear() it first")

    def record(self, step: int, name: str, tensors: Dict[str, torch.Tensor], num_steps: int,
               num_halves: int) -> None:
        """Store copies (detached, on ``device``) of one layer's source tensors at one step."""
        self._check(num_steps, num_halves, "record")
        self.num_steps, self.num_halves = num_steps, num_halves
        self._store[(step, name)] = {
            k: t.detach().to(self.device or t.device, copy=True) for k, t in tensors.items()}

    def fetch(self, step: int, name: str, num_steps: int, num_halves: int, keys: Iterable[str],
              device, dtype) -> Dict[str, torch.Tensor]:
        """The tensors recorded for (step, name), on ``device`` in ``dtype``."""
        self._check(num_steps, num_halves, "replay")
        entry = self._store.get((step, name))
        missing = [k for k in keys if entry is None or k not in entry]
        if missing:
            raise RuntimeError(
                f"SourceCache has no {', '.join(missing)} for step {step}, layer {name!r}: record a "
                "full batch (BranchLayout(include_sources=True)) with the same config and schedule first")
        return {k: entry[k].to(device=device, dtype=dtype) for k in keys}


# ------------------------------------------------------------------------------------------------
# AttnProcessor2_0-equivalent prelude / epilogue
# ------------------------------------------------------------------------------------------------
@dataclass
class _Call:
    """What AttnProcessor2_0 keeps between projecting Q/K/V and the output projection."""

    residual: torch.Tensor
    input_ndim: int
    shape4: Optional[Tuple[int, int, int, int]]
    batch_size: int
    attention_mask: Optional[torch.Tensor]
    q: torch.Tensor  # (B, H, Lq, D)
    k: torch.Tensor  # (B, H, Lk, D)
    v: torch.Tensor


def _prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> _Call:
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    shape4 = None
    if input_ndim == 4:
        shape4 = tuple(hidden_states.shape)
        b, c, h, w = shape4
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return _Call(residual, input_ndim, shape4, batch_size, attention_mask, query, key, value)


def _epilogue(attn, call: _Call, out: torch.Tensor) -> torch.Tensor:
    b, heads, _, head_dim = out.shape
    hidden_states = out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(call.q.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if call.input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*call.shape4)
    if attn.residual_connection:
        hidden_states = hidden_states + call.residual
    return hidden_states / attn.rescale_output_factor


def _sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def _spatial(call: _Call) -> Optional[Tuple[int, int]]:
    """The (h, w) token grid when the input was 4-D; else None (inferred from the token count)."""
    return None if call.shape4 is None else (call.shape4[2], call.shape4[3])


class GraftSelfAttnProcessor:
    """Self-attention processor: TriAG / Q graft on target rows when active, else AttnProcessor2_0."""

    def __init__(self, graft: "AttentionGraft", index: int, name: str):
        self.graft, self.index, self.name = graft, index, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        mode = None if encoder_hidden_states is not None else self.graft._self_mode(self.index, self.name)
        call = _prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if mode is None:
            out = _sdpa(call.q, call.k, call.v, call.attention_mask)
        else:
            if call.attention_mask is not None:
                raise RuntimeError(f"{self.name}: grafting does not support an attention_mask on "
                                   "self-attention")
            out = self.graft._self_graft(mode, self.name, call.q, call.k, call.v,
                                         _spatial(call))
        return _epilogue(attn, call, out)


class GraftCrossAttnProcessor:
    """Cross-attention processor: DAE on conditional target rows inside M_T when active, else
    AttnProcessor2_0."""

    def __init__(self, graft: "AttentionGraft", index: int, name: str):
        self.graft, self.index, self.name = graft, index, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        call = _prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out = _sdpa(call.q, call.k, call.v, call.attention_mask)
        if encoder_hidden_states is not None and self.graft._dae_on(self.index):
            self.graft._dae(call, out, _spatial(call))
        return _epilogue(attn, call, out)


# ------------------------------------------------------------------------------------------------
# the graft
# ------------------------------------------------------------------------------------------------
class AttentionGraft:
    """Drives the grafting processors of one tri-branch batch layout (see module docstring).

    >>> graft = AttentionGraft(GraftConfig.paper(), BranchLayout(num_targets=4))
    >>> graft.set_masks(ref_mask, target_masks)
    >>> with graft.installed(unet):
    ...     for i, t in enumerate(timesteps):
    ...         graft.set_step(i, len(timesteps))
    ...         eps = unet(latents, t, encoder_hidden_states=emb).sample
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
        self._ref: Optional[torch.Tensor] = None
        self._targets: Optional[torch.Tensor] = None
        self._pyramid: Dict[tuple, torch.Tensor] = {}
        self._dae_bias: Dict[tuple, torch.Tensor] = {}
        self._plan: Optional[StepPlan] = None
        self._tokens: Tuple[int, ...] = ()
        self._unet = None

    # ---- inputs --------------------------------------------------------------------------------
    def set_masks(self, ref_mask, target_masks) -> None:
        """Reference mask M_R (H, W) and target masks M_T (N, H, W): bool, 0/1 integer, or float in
        [0, 1] (thresholded at 0.5), in image or latent space. Per-resolution pyramids are built
        lazily, once per layer size, and cached until the next call."""
        ref = _as_mask("ref_mask", ref_mask, 2)
        tgt = _as_mask("target_masks", target_masks, 3)
        if tgt.shape[0] != self.layout.num_targets:
            raise ValueError(f"target_masks holds {tgt.shape[0]} masks but the layout has "
                             f"{self.layout.num_targets} targets")
        self._ref, self._targets = ref, tgt
        self._pyramid = {}
        self._dae_bias = {}

    def set_step(self, step: int, num_steps: int) -> None:
        """Select the phases of denoising step ``step`` (0-based) of ``num_steps``."""
        self._plan = self.config.plan(step, num_steps)

    def set_token_indices(self, indices: Iterable[int]) -> None:
        """Prompt token positions of the anomaly word(s) that DAE amplifies (empty: DAE off)."""
        if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
            raise ValueError(f"indices must be a sequence of ints, got {indices!r}")
        out = []
        for i in indices:
            i = int(i) if isinstance(i, (np.integer, torch.Tensor)) and not isinstance(i, bool) else i
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ValueError(f"indices must hold non-negative ints, got {i!r}")
            out.append(i)
        self._tokens = tuple(sorted(set(out)))
        self._dae_bias = {}

    @property
    def plan(self) -> Optional[StepPlan]:
        return self._plan

    # ---- installation --------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, unet):
        """Install the grafting processors on ``unet`` (``set_attn_processor``) and restore the
        original processors on exit, also when the body raises."""
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
        for info in layers:
            procs[info.self_name] = GraftSelfAttnProcessor(self, info.index, info.self_name)
            if info.cross_name is not None:
                procs[info.cross_name] = GraftCrossAttnProcessor(self, info.index, info.cross_name)
        unet.set_attn_processor(procs)
        self._unet = unet
        try:
            yield self
        finally:
            unet.set_attn_processor(dict(originals))
            self._unet = None

    # ---- per-call helpers ----------------------------------------------------------------------
    def _needs_plan(self) -> None:
        if self._plan is None:
            raise RuntimeError("call graft.set_step(i, num_steps) before running the UNet")

    def _self_mode(self, index: int, name: str) -> Optional[str]:
        cfg = self.config
        if self._plan is None:
            if (cfg.graft_steps is None or not (cfg.graft_layers or cfg.graft_layer_names)) and \
                    (cfg.qgraft_steps is None or not cfg.qgraft_layers):
                return None
            self._needs_plan()
        return cfg.self_mode(self._plan, index, name)

    def _dae_on(self, index: int) -> bool:
        cfg = self.config
        if self._plan is None:
            if cfg.dae_steps is None or not cfg.dae_layers or cfg.dae_gain == 1.0:
                return False
            self._needs_plan()
        return bool(self._tokens) and cfg.dae_on(self._plan, index)

    def _check_batch(self, batch: int, name: str) -> None:
        if batch != self.layout.batch_size:
            raise RuntimeError(f"{name}: the UNet batch has {batch} rows but {self.layout!r} needs "
                               f"{self.layout.batch_size}; assemble latents with the layout")
        if self._targets is None:
            raise RuntimeError("call graft.set_masks(ref_mask, target_masks) before running the UNet")

    def _mask(self, which: str, mode: str, length: int, hw, device) -> torch.Tensor:
        base = self._ref if which == "ref" else self._targets
        size = hw if hw is not None else _grid(length, *self._targets.shape[-2:])
        key = (which, mode, size, str(device))
        m = self._pyramid.get(key)
        if m is None:
            m = _down(base if which != "ref" else base[None], size, mode).to(device)
            self._pyramid[key] = m
        return m

    def stitch_masks(self, size: Tuple[int, int], device) -> torch.Tensor:
        """M_T at latent ``size`` (h, w) as float 0/1 (N, 1, h, w), downsampled exactly like the
        TriAG query masks (``config.target_mask_mode``: max-pooling in the paper preset), so the
        background blend and the grafting agree on where the defect goes."""
        if self._targets is None:
            raise RuntimeError("call graft.set_masks(ref_mask, target_masks) first")
        h, w = size
        m = self._mask("tgt", self.config.target_mask_mode, h * w, (h, w), device)
        return m.view(-1, 1, h, w).float()

    def layer_masks(self, mode: str, length: int, device, hw=None) -> LayerMasks:
        """The masks a self-attention layer with ``length`` tokens uses in ``mode``
        ('graft' or 'qgraft'); cached per resolution."""
        cfg = self.config
        if mode == "qgraft":
            m = cfg.qgraft_mask_mode
            t = self._mask("tgt", m, length, hw, device)
            bg = ~t if cfg.exclude_target_from_background else None
            return LayerMasks(t, self._mask("ref", m, length, hw, device), bg, t)
        t = self._mask("tgt", cfg.target_mask_mode, length, hw, device)
        excl = self._mask("tgt", cfg.exclusion_mask_mode, length, hw, device)
        bg = ~excl if cfg.exclude_target_from_background else None
        return LayerMasks(t, self._mask("ref", cfg.reference_mask_mode, length, hw, device), bg, None)

    def _self_graft(self, mode: str, name: str, q, k, v, hw) -> torch.Tensor:
        lay, plan, cfg = self.layout, self._plan, self.config
        self._check_batch(q.shape[0], name)
        B, H, L, D = q.shape
        masks = self.layer_masks(mode, L, q.device, hw)
        gain = plan.fg_gain if (mode == "graft" or cfg.fg_gain_in_qgraft) else 1.0
        keys = SOURCE_KEYS + (QGRAFT_KEYS if mode == "qgraft" else ())
        out = q.new_empty(B, H, L, D)
        halves = range(lay.num_halves)
        if lay.include_sources:
            # per half: views of the reference / normal rows (no copies of K/V)
            views = []
            for h in halves:
                sl = lay.source_slice(h)
                out[sl] = _sdpa(q[sl], k[sl], v[sl])
                r, n = sl.start, sl.start + 1
                views.append({"k_ref": k[r:r + 1], "v_ref": v[r:r + 1], "k_norm": k[n:n + 1],
                              "v_norm": v[n:n + 1], "q_ref": q[r:r + 1], "q_norm": q[n:n + 1]})
            if self.source_cache is not None:
                self.source_cache.record(plan.step, name, {key: torch.cat([vw[key] for vw in views])
                                                           for key in keys}, plan.num_steps, lay.num_halves)
        else:
            src = self.source_cache.fetch(plan.step, name, plan.num_steps, lay.num_halves, keys,
                                          q.device, q.dtype)
            views = [{key: t[h:h + 1] for key, t in src.items()} for h in halves]
        for h in halves:
            tsl, sv = lay.target_slice(h), views[h]
            if mode == "qgraft":
                qt = torch.where(masks.qsel[:, None, :, None], sv["q_ref"], sv["q_norm"])
            else:
                qt = q[tsl]
            out[tsl] = tri_source_attention(
                qt, sv["k_ref"], sv["v_ref"], sv["k_norm"], sv["v_norm"],
                masks.query, masks.fg, masks.bg, fg_gain=gain, backend=cfg.backend)
        return out

    def _dae(self, call: _Call, out: torch.Tensor, hw) -> None:
        """In place on ``out``: DAE rows (target rows, conditional half unless configured otherwise,
        queries inside M_T) get the anomaly tokens' probabilities times the gain, renormalised."""
        lay, cfg = self.layout, self.config
        q, k, v = call.q, call.k, call.v
        self._check_batch(q.shape[0], "cross-attention")
        T = k.shape[2]
        bad = [i for i in self._tokens if i >= T]
        if bad:
            raise ValueError(f"token indices {bad} are out of range for {T} text tokens")
        inside = self._mask("tgt", cfg.dae_mask_mode, q.shape[2], hw, q.device)  # (N, L)
        # The bias depends only on the masks, tokens, resolution and dtype: build it once per
        # layer size, not on every cross-attention call of every step.
        key = (q.shape[2], hw, T, q.dtype, str(q.device))
        bias = self._dae_bias.get(key)
        if bias is None:
            col = torch.zeros(T, dtype=torch.bool, device=q.device)
            col[list(self._tokens)] = True
            # multiplying probabilities by g and renormalising == adding log(g) to those logits
            bias = (inside[:, None, :, None] & col).to(q.dtype) * math.log(cfg.dae_gain)  # (N, 1, L, T)
            self._dae_bias[key] = bias
        halves = [lay.cond_half] if cfg.dae_cond_only else range(lay.num_halves)
        for h in halves:
            tsl = lay.target_slice(h)
            mask = bias if call.attention_mask is None else bias + call.attention_mask[tsl]
            boosted = _sdpa(q[tsl], k[tsl], v[tsl], mask)
            out[tsl] = torch.where(inside[:, None, :, None], boosted, out[tsl])
