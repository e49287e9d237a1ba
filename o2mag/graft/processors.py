"""The grafting processors: real diffusers attention processors that run TriAG, the Q graft and
DAE on the target rows, and hand every other call to the layer's original processor.

Installed by :meth:`o2mag.AttentionGraft.installed` on the layers the config touches only. What is
active when lives in :class:`o2mag.GraftConfig` (read through the graft's current step plan), the
batch order in :class:`o2mag.BranchLayout`, the masks in :class:`~o2mag.graft.pyramid.MaskPyramid`.
"""
from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from o2mag_kernels import tri_source_attention

from .attention import Call, epilogue, prelude, sdpa, spatial
from .source_cache import QGRAFT_KEYS, SOURCE_KEYS


_SIGNED: dict = {}


def _with_signature_of(cls, original) -> type:
    """``cls`` with a ``__call__`` whose signature is ``original``'s (a subclass, one per class and
    signature). diffusers' ``Attention.forward`` reads ``inspect.signature(processor.__call__)`` to
    decide which ``cross_attention_kwargs`` to pass and which to drop with a warning; showing the
    wrapped processor's parameters makes that choice the same as without o2mag, so the grafting
    processor receives, and hands on when idle, exactly what the original would have received. A
    subclass rather than an instance attribute keeps ``torch.compile`` tracing the call."""
    sig = inspect.signature(original.__call__)
    key = (cls, str(sig))
    sub = _SIGNED.get(key)
    if sub is None:
        def __call__(self, *args, **kwargs):
            return cls.__call__(self, *args, **kwargs)

        own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        __call__.__signature__ = sig.replace(parameters=[own, *sig.parameters.values()])
        sub = _SIGNED[key] = type(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return sub


class _GraftProcessor:
    def __new__(cls, graft, index: int, name: str, original=None):
        shown = original if original is not None else AttnProcessor2_0()
        return super().__new__(_with_signature_of(cls, shown))

    def __init__(self, graft, index: int, name: str, original=None):
        self.graft, self.index, self.name = graft, index, name
        self.original = original if original is not None else AttnProcessor2_0()

    def _idle(self, attn, hidden_states, encoder_hidden_states, attention_mask, args, kwargs):
        """The call exactly as diffusers made it, to the processor this one replaced: the
        encoder states and the mask by name (as ``Attention.forward`` passes them) unless the
        caller passed further positional arguments, every keyword as it came."""
        if args:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args,
                                 **kwargs)
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)

    def _active_extras(self, args, kwargs):
        """``temb`` (what ``AttnProcessor2_0`` takes beyond the mask) from a call the graft
        replaces; any other argument with a value is an error naming the layer."""
        if args:
            temb, args = args[0], args[1:]
        else:
            temb = kwargs.get("temb")
        extra = sorted(k for k, v in kwargs.items() if k != "temb" and v is not None)
        if args or extra:
            raise self._unsupported(f"extra arguments {extra or len(args)}")
        return temb

    def _unsupported(self, what: str):
        return ValueError(f"{self.name}: grafting is active on this layer and cannot take {what}; "
                          "leave this layer out of the GraftConfig (graft_layers / qgraft_layers / "
                          "dae_layers) or run it without that input")


class GraftSelfAttnProcessor(_GraftProcessor):
    """Self-attention: TriAG or the Q graft on the target rows when the step and layer call for
    it (sources attend to themselves, as in a plain UNet call); otherwise the original processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        mode = None if encoder_hidden_states is not None else self.graft.self_mode(self.index,
                                                                                   self.name)
        if mode is None:
            return self._idle(attn, hidden_states, encoder_hidden_states, attention_mask, args,
                              kwargs)
        if attention_mask is not None:
            raise self._unsupported("an attention_mask")
        temb = self._active_extras(args, kwargs)
        call = prelude(attn, hidden_states, None, None, temb)
        return epilogue(attn, call, self._graft(mode, call))

    def _graft(self, mode: str, call: Call) -> torch.Tensor:
        """Target rows over the reference (inside M_T) or normal (outside) K/V of their own CFG
        half, through one tri-source call per half with the resolution's prebuilt mask."""
        g = self.graft
        lay, plan, cfg = g.layout, g.plan, g.config
        q, k, v = call.q, call.k, call.v
        g.check_batch(q.shape[0], self.name)
        B, H, L, D = q.shape
        masks = g.layer_masks(mode, L, q.device, spatial(call))
        gain = plan.fg_gain if (mode == "graft" or cfg.fg_gain_in_qgraft) else 1.0
        keys = SOURCE_KEYS + (QGRAFT_KEYS if mode == "qgraft" else ())
        out = q.new_empty(B, H, L, D)
        halves = range(lay.num_halves)
        cache = g.source_cache
        if lay.include_sources:
            views = []  # per half: views of the reference / normal rows (no copies of K/V)
            for h in halves:
                sl = lay.source_slice(h)
                out[sl] = sdpa(q[sl], k[sl], v[sl])
                r, n = sl.start, sl.start + 1
                views.append({"k_ref": k[r:r + 1], "v_ref": v[r:r + 1], "k_norm": k[n:n + 1],
                              "v_norm": v[n:n + 1], "q_ref": q[r:r + 1], "q_norm": q[n:n + 1]})
            if cache is not None:
                cache.record(plan.step, self.name, {key: torch.cat([vw[key] for vw in views])
                                                    for key in keys}, plan.num_steps, lay.num_halves)
        else:
            src = cache.fetch(plan.step, self.name, plan.num_steps, lay.num_halves, keys, q.device,
                              q.dtype)
            views = [{key: t[h:h + 1] for key, t in src.items()} for h in halves]
        for h in halves:
            tsl, sv = lay.target_slice(h), views[h]
            if mode == "qgraft":
                qt = torch.where(masks.qsel[:, None, :, None], sv["q_ref"], sv["q_norm"])
            else:
                qt = q[tsl]
            out[tsl] = tri_source_attention(qt, sv["k_ref"], sv["v_ref"], sv["k_norm"], sv["v_norm"],
                                            masks.routing, fg_gain=gain, backend=cfg.backend)
        return out


class GraftCrossAttnProcessor(_GraftProcessor):
    """Cross-attention: DAE on the conditional target rows inside M_T when the step and layer
    call for it; otherwise the original processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if encoder_hidden_states is None or not self.graft.dae_on(self.index):
            return self._idle(attn, hidden_states, encoder_hidden_states, attention_mask, args,
                              kwargs)
        if isinstance(encoder_hidden_states, (tuple, list)):
            raise self._unsupported("IP-Adapter style (tuple) encoder_hidden_states")
        temb = self._active_extras(args, kwargs)
        call = prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out = sdpa(call.q, call.k, call.v, call.attention_mask)
        self._dae(call, out, spatial(call))
        return epilogue(attn, call, out)

    def _dae(self, call: Call, out: torch.Tensor, hw) -> None:
        """In place on ``out``: DAE rows (target rows, conditional half unless configured otherwise,
        queries inside M_T) get the anomaly tokens' probabilities times the gain, renormalised."""
        g = self.graft
        lay, cfg = g.layout, g.config
        q, k, v = call.q, call.k, call.v
        g.check_batch(q.shape[0], self.name)
        T = k.shape[2]
        tokens = g.token_indices
        bad = [i for i in tokens if i >= T]
        if bad:
            raise ValueError(f"token indices {bad} are out of range for {T} text tokens")
        inside = g.pyramid.mask("tgt", cfg.dae_mask_mode, q.shape[2], hw, q.device)  # (N, L)
        bias = g.dae_logit_bias(q.shape[2], hw, T, q.dtype, q.device)
        halves = [lay.cond_half] if cfg.dae_cond_only else range(lay.num_halves)
        for h in halves:
            tsl = lay.target_slice(h)
            mask = bias if call.attention_mask is None else bias + call.attention_mask[tsl]
            boosted = sdpa(q[tsl], k[tsl], v[tsl], mask)
            out[tsl] = torch.where(inside[:, None, :, None], boosted, out[tsl])
