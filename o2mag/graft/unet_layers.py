"""Where the transformer blocks of a diffusers UNet are, in the order they run."""
from __future__ import annotations

from typing import List, NamedTuple, Optional


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
