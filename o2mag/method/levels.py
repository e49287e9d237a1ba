"""A diffusers UNet's transformer blocks grouped by level: which part of the UNet (down, mid, up),
which block, and how far below the latent resolution it runs.

The paper's layer rule is stated for SD 1.5's 16 blocks by index; :meth:`o2mag.GraftConfig.for_unet`
restates it by position (a decoder level's downsampling factor and a share of its blocks), and this
module supplies the positions. Blocks are counted in execution order (down, mid, up), the order
:func:`o2mag.graft.transformer_layers` numbers them in, so the indices mean the same thing to both.
The walk reads only the module attributes every ``UNet2DConditionModel`` has (``down_blocks``,
``mid_block``, ``up_blocks``, their ``attentions``, ``downsamplers`` and ``upsamplers``).
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

__all__ = ["AttentionLevel", "attention_levels"]


class AttentionLevel(NamedTuple):
    """The transformer blocks of one UNet block, in execution order.

    ``part`` is "down", "mid" or "up"; ``block`` the block's position in its part (0 for mid);
    ``factor`` how many times smaller than the latent its attention runs (1 = latent size: SD 1.5's
    64x64 level at 512 px, 2 = 32x32, 4 = 16x16, 8 = 8x8); ``layers`` the execution-order indices of
    its transformer blocks (each has one self-attention and, in a conditional UNet, one
    cross-attention); ``cross`` whether they have cross-attention."""

    part: str
    block: int
    factor: int
    layers: Tuple[int, ...]
    cross: bool


def _blocks_of(block) -> list:
    out = []
    for transformer in getattr(block, "attentions", None) or []:
        out.extend(tb for tb in (getattr(transformer, "transformer_blocks", None) or [])
                   if getattr(tb, "attn1", None) is not None)
    return out


def attention_levels(unet) -> List[AttentionLevel]:
    """Every UNet block that holds transformer blocks, in execution order (blocks without attention,
    such as SD's ``UpBlock2D``, are left out, though they still count for the resolution)."""
    out: List[AttentionLevel] = []
    count = 0
    factor = 1

    def add(part: str, index: int, block) -> None:
        nonlocal count
        tbs = _blocks_of(block)
        if tbs:
            out.append(AttentionLevel(part, index, factor, tuple(range(count, count + len(tbs))),
                                      any(getattr(tb, "attn2", None) is not None for tb in tbs)))
            count += len(tbs)

    for i, block in enumerate(getattr(unet, "down_blocks", None) or []):
        add("down", i, block)
        if getattr(block, "downsamplers", None):
            factor *= 2
    if getattr(unet, "mid_block", None) is not None:
        add("mid", 0, unet.mid_block)
    for i, block in enumerate(getattr(unet, "up_blocks", None) or []):
        add("up", i, block)
        if getattr(block, "upsamplers", None):
            factor = max(1, factor // 2)
    return out
