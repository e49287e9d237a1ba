"""Kernel benchmark cases and the baselines every backend is compared with.

A case is one grafted self-attention layer of SD: N target rows share ONE reference (foreground) and
ONE normal (background) source. Masks come from :mod:`o2mag_kernels.tools.synthetic`: ``blob`` (the
reference defect and affine copies of it at new places, as the pipeline makes them) or
``scattered`` (random positions at the same density, the worst case for tile skipping); the
background key mask is NOT M_T per target, as the authors' code excludes normal keys inside M_T.

Our backends get a prebuilt :class:`o2mag_kernels.TriSourceMask`, as the grafting layer passes
them (built once per resolution and reused by every head, layer and step; its build time is
reported separately). Baselines (the same inputs, the same masks):
- ``reference``: the authors' formula, two dense masked attentions and a stitch;
- ``sdpa_stitch``: the same with two masked ``scaled_dot_product_attention`` calls;
- ``flex``: compiled FlexAttention over concatenated ``[K_fg; K_bg]`` with a mask_mod and a
  score_mod for the gain, its block mask prebuilt (outside the timing) like ours;
- ``sdpa_plain``: ONE unmasked SDPA over Lq×Lb: the floor for "grafting costs nothing".
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from o2mag_kernels import tri_source_attention, tri_source_mask
from o2mag_kernels.validation import validate
from o2mag_kernels.flops import useful_flops as kernel_flops
from o2mag_kernels.tools.synthetic import mask_set

FG_GAIN = 1 / 0.7  # the paper preset's foreground sharpening


@dataclass(frozen=True)
class Case:
    tokens: int
    heads: int
    head_dim: int
    density: float
    targets: int
    dtype: str
    masks: str = "blob"

    @property
    def name(self) -> str:
        return (f"L{self.tokens}-H{self.heads}-D{self.head_dim}-{self.masks}{self.density:g}"
                f"-N{self.targets}-{self.dtype}")

    def as_dict(self):
        return asdict(self) | {"name": self.name}


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(case: Case, device, seed: int = 0):
    """Seeded random inputs (never zeros) for one case: (q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm).

    q and the sources are ``(B, L, H*D)`` projections viewed as ``(B, H, L, D)``, as diffusers
    hands them over."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    N, H, L, D = case.targets, case.heads, case.tokens, case.head_dim

    def proj(b):
        x = torch.randn(b, L, H * D, generator=g).to(device=device, dtype=dtype)
        return x.view(b, L, H, D).transpose(1, 2)

    q = proj(N)
    k_fg, v_fg, k_bg, v_bg = (proj(1) for _ in range(4))
    qm, fgm, bgm = mask_set(case.masks, N, L, density=case.density, seed=seed, device=device)
    return q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm


def useful_flops(case: Case, inputs) -> int:
    """4·D·H·Σ_i |keys(i)|: only the keys each query really attends (o2mag_kernels.flops)."""
    problem = validate(*inputs, None, FG_GAIN, "auto")
    return kernel_flops(problem, *inputs[5:])


def _backend(name):
    def run(q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm):
        return tri_source_attention(q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm,
                                    fg_gain=FG_GAIN, backend=name)
    return run


def _prebuilt(name, inputs):
    """Our backend as the grafting layer calls it: a TriSourceMask built once, then reused."""
    q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm = inputs
    mask = tri_source_mask(qm, fgm, bgm)
    if name == "torch":
        mask.host()  # the one host read of a mask's lifetime, done at build time as prepare() does
    return lambda: tri_source_attention(q, k_fg, v_fg, k_bg, v_bg, mask, fg_gain=FG_GAIN, backend=name)


def sdpa_stitch(q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm):
    """Two masked SDPA calls over every key, then a per-query select (what a port would do)."""
    scale = q.shape[-1] ** -0.5
    out_fg = F.scaled_dot_product_attention(
        q, k_fg.expand(q.shape[0], -1, -1, -1), v_fg.expand(q.shape[0], -1, -1, -1),
        attn_mask=fgm[:, None, None, :], scale=scale * FG_GAIN)
    out_bg = F.scaled_dot_product_attention(
        q, k_bg.expand(q.shape[0], -1, -1, -1), v_bg.expand(q.shape[0], -1, -1, -1),
        attn_mask=bgm[:, None, None, :], scale=scale)
    return torch.where(qm[:, None, :, None], out_fg, out_bg)


def sdpa_plain(q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm):
    """ONE unmasked attention over the background source: the cost floor."""
    return F.scaled_dot_product_attention(
        q, k_bg.expand(q.shape[0], -1, -1, -1), v_bg.expand(q.shape[0], -1, -1, -1))


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_prepare(q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm):
    """Build the concatenated K/V and the block mask (outside the timed region, done once)."""
    from torch.nn.attention.flex_attention import create_block_mask

    N, L_f = q.shape[0], k_fg.shape[2]
    k = torch.cat([k_fg, k_bg], dim=2).expand(N, -1, -1, -1)
    v = torch.cat([v_fg, v_bg], dim=2).expand(N, -1, -1, -1)
    keymask = torch.cat([fgm.expand(N, -1), bgm], dim=1)

    def mask_mod(b, h, qi, ki):
        return keymask[b, ki] & (qm[b, qi] == (ki < L_f))

    def score_mod(score, b, h, qi, ki):
        return torch.where(ki < L_f, score * FG_GAIN, score)

    block_mask = create_block_mask(mask_mod, N, None, q.shape[2], k.shape[2], device=q.device)
    flex = _compiled_flex()
    return lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


BASELINES = {
    "reference": _backend("reference"),
    "sdpa_stitch": sdpa_stitch,
    "sdpa_plain": sdpa_plain,
}


def runner(method: str, inputs):
    """A zero-argument callable that runs ``method`` on ``inputs`` (setup outside the timing)."""
    if method == "flex":
        return flex_prepare(*inputs)
    if method in ("torch", "triton"):
        return _prebuilt(method, inputs)
    fn = BASELINES.get(method) or _backend(method)
    return lambda: fn(*inputs)


def flex_status(device) -> tuple:
    """Whether compiled FlexAttention works here, and why not."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the torch build
        return False, f"flex_attention not importable: {exc}"
    return True, "torch.compile(flex_attention)"
