"""The steps of diffusers' ``AttnProcessor2_0`` around the attention itself, split so the grafting
processors can compute Q/K/V exactly as diffusers does, replace the attention, and finish the same
way (group/spatial norm, 4-D inputs, attention masks, residual and output rescaling)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


@dataclass
class Call:
    """What AttnProcessor2_0 keeps between projecting Q/K/V and the output projection."""

    residual: torch.Tensor
    input_ndim: int
    shape4: Optional[Tuple[int, int, int, int]]
    batch_size: int
    attention_mask: Optional[torch.Tensor]
    q: torch.Tensor  # (B, H, Lq, D)
    k: torch.Tensor  # (B, H, Lk, D)
    v: torch.Tensor


def prelude(attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> Call:
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
    return Call(residual, input_ndim, shape4, batch_size, attention_mask, query, key, value)


def epilogue(attn, call: Call, out: torch.Tensor) -> torch.Tensor:
    b, heads, _, head_dim = out.shape
    hidden_states = out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(call.q.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if call.input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*call.shape4)
    if attn.residual_connection:
        hidden_states = hidden_states + call.residual
    return hidden_states / attn.rescale_output_factor


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def spatial(call: Call) -> Optional[Tuple[int, int]]:
    """The (h, w) token grid when the input was 4-D; else None (inferred from the token count)."""
    return None if call.shape4 is None else (call.shape4[2], call.shape4[3])
