"""What attention grafting does, where and when: the single source of truth for layers, step windows,
gains and mask-downsampling rules (:class:`GraftConfig`).

Step windows are half-open ``(start, end)`` pairs, either fractions of the schedule (floats in
[0, 1]) or step indices (ints); :meth:`GraftConfig.step_range` converts them for any number of
steps (fractions: ``floor(num_steps * x)``, as the authors' code does). ``None`` means "never".
Layers are counted in the UNet's execution order of transformer blocks (SD 1.x/2.x: down 0-5,
mid 6, up 7-15; SDXL: down 0-23, mid 24-33, up 34-69). :meth:`GraftConfig.for_unet` restates the
paper's SD 1.5 layers by position (:data:`PAPER_DECODER_SHARE`) for any diffusers UNet.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from o2mag_kernels import BACKENDS  # the op's own list: a config cannot name a backend it lacks

from ..checks import is_int, is_number
from .levels import attention_levels

Window = Optional[Union[Tuple[float, float], Tuple[int, int]]]
MASK_MODES = ("max", "nearest")
PAPER_TEMPERATURE = 0.7
PAPER_DECODER_SHARE: Dict[int, float] = {4: 1.0 / 3.0, 2: 1.0, 1: 1.0}
"""The paper's TriAG layers by position: for each decoder (up) level that runs attention at 1/f of
the latent side, the share of its transformer blocks, counted from the level's end, that TriAG
grafts. On SD 1.5 (decoder levels 16x16, 32x32, 64x64 at 512 px: f = 4, 2, 1, three blocks each)
this is the last block of the 16x16 level and every block of the two finer ones: layers 9-15.
Levels at other factors (SD's 8x8 middle) are not grafted."""


def _ranges(indices) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2, 5"``."""
    out, run = [], []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out) or "none"


def _norm_window(name: str, w) -> Window:
    if w is None:
        return None
    if not isinstance(w, (tuple, list)) or len(w) != 2:
        raise ValueError(f"{name} must be None or a (start, end) pair, got {w!r}")
    a, b = w
    if is_int(a) and is_int(b):
        if a < 0 or b < a:
            raise ValueError(f"{name} step indices must satisfy 0 <= start <= end, got {w!r}")
        return (a, b)
    if isinstance(a, float) and isinstance(b, float):
        if not (math.isfinite(a) and math.isfinite(b) and 0.0 <= a <= b <= 1.0):
            raise ValueError(f"{name} fractions must satisfy 0 <= start <= end <= 1, got {w!r}")
        return (a, b)
    raise ValueError(f"{name} must hold two ints (step indices) or two floats (fractions), got {w!r}")


def _norm_layers(name: str, layers) -> Tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"{name} must be a sequence of layer indices, got {layers!r}")
    out = tuple(layers)
    for i in out:
        if not is_int(i) or i < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {i!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {out!r}")
    return tuple(sorted(out))


def _norm_names(name: str, names) -> Tuple[str, ...]:
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise ValueError(f"{name} must be a sequence of processor names, got {names!r}")
    out = []
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"{name} must hold non-empty strings, got {n!r}")
        out.append(n if n.endswith(".processor") else n + ".processor")
    return tuple(out)


@dataclass(frozen=True)
class StepPlan:
    """What is active at one denoising step (derived from a :class:`GraftConfig`)."""

    step: int
    num_steps: int
    qgraft: bool
    graft: bool
    fg_gain: float
    dae: bool


@dataclass(frozen=True)
class GraftConfig:
    """Attention-grafting settings. ``GraftConfig()`` is the paper preset (:meth:`paper`).

    TriAG phase (``graft_steps`` on ``graft_layers``/``graft_layer_names``): each target keeps its
    own Q; queries inside M_T attend to the reference K/V restricted to M_R with logits times
    ``fg_gain`` (only in ``fg_gain_steps`` when that is set), the others to the normal K/V (minus
    the keys inside M_T when ``exclude_target_from_background``).
    Q-graft phase (``qgraft_steps`` on ``qgraft_layers``; it wins where both windows hold): as
    TriAG, but the target's Q is the reference Q inside M_T and the normal Q outside, every mask is
    downsampled with ``qgraft_mask_mode`` and the foreground gain is 1 unless ``fg_gain_in_qgraft``.
    DAE (``dae_steps`` on ``dae_layers`` cross-attention, conditional half only unless
    ``dae_cond_only=False``): inside M_T the anomaly tokens' attention probabilities are multiplied
    by ``dae_gain`` and the rows renormalised. Token indices are set at run time.
    Mask modes: "max" = adaptive max-pooling (a defect never vanishes at low resolution),
    "nearest" = nearest-neighbour sampling.
    """

    graft_layers: Tuple[int, ...] = tuple(range(9, 16))
    graft_layer_names: Tuple[str, ...] = ()
    graft_steps: Window = (0.1, 1.0)
    fg_gain: float = 1.0 / PAPER_TEMPERATURE
    fg_gain_steps: Window = None
    exclude_target_from_background: bool = True
    target_mask_mode: str = "max"
    reference_mask_mode: str = "max"
    exclusion_mask_mode: str = "nearest"
    qgraft_layers: Tuple[int, ...] = tuple(range(16))
    qgraft_steps: Window = (0.0, 0.1)
    qgraft_mask_mode: str = "nearest"
    fg_gain_in_qgraft: bool = False
    dae_gain: float = 100.0
    dae_steps: Window = (0.4, 0.8)
    dae_layers: Tuple[int, ...] = tuple(range(16))
    dae_mask_mode: str = "nearest"
    dae_cond_only: bool = True
    backend: str = "auto"

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        s("graft_layers", _norm_layers("graft_layers", self.graft_layers))
        s("qgraft_layers", _norm_layers("qgraft_layers", self.qgraft_layers))
        s("dae_layers", _norm_layers("dae_layers", self.dae_layers))
        s("graft_layer_names", _norm_names("graft_layer_names", self.graft_layer_names))
        for w in ("graft_steps", "fg_gain_steps", "qgraft_steps", "dae_steps"):
            s(w, _norm_window(w, getattr(self, w)))
        for g in ("fg_gain", "dae_gain"):
            v = getattr(self, g)
            if not is_number(v) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{g} must be a finite number > 0, got {v!r}")
            s(g, float(v))
        for b in ("exclude_target_from_background", "fg_gain_in_qgraft", "dae_cond_only"):
            if not isinstance(getattr(self, b), bool):
                raise ValueError(f"{b} must be a bool, got {getattr(self, b)!r}")
        for m in ("target_mask_mode", "reference_mask_mode", "exclusion_mask_mode", "qgraft_mask_mode",
                  "dae_mask_mode"):
            if getattr(self, m) not in MASK_MODES:
                raise ValueError(f"{m} must be one of {MASK_MODES}, got {getattr(self, m)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def paper(cls, **changes: Any) -> "GraftConfig":
        """The authors' defaults: TriAG on layers 9-15 for steps [10%, 100%) (5-49 of 50), Q graft on
        all 16 layers for [0, 10%) (0-4), foreground temperature 0.7, normal keys inside M_T
        excluded, M_R/M_T max-pooled, nearest masks for the exclusion, the Q graft and DAE; DAE gain
        100 for [40%, 80%) (20-39 of 50), conditional half."""
        return cls(**changes)

    @classmethod
    def for_unet(cls, unet, **changes: Any) -> "GraftConfig":
        """The paper's settings with its layers restated by position for ``unet`` (any diffusers
        ``UNet2DConditionModel``): TriAG on the blocks :data:`PAPER_DECODER_SHARE` picks (the last
        third of the decoder level at 1/4 of the latent side, all of those at 1/2 and 1/1), the Q
        graft on every transformer block, DAE on every block with cross-attention. On SD 1.x/2.x
        this is exactly :meth:`paper`; on SDXL (70 blocks) TriAG takes layers 54-69: the last 10 of
        the 30 decoder blocks at 32x32 and the 6 at 64x64. ``changes`` override any field."""
        levels = attention_levels(unet)
        if not levels:
            raise ValueError("unet has no transformer blocks (down_blocks/mid_block/up_blocks "
                             "without attentions): there is no attention to graft")
        graft = []
        for level in levels:
            share = PAPER_DECODER_SHARE.get(level.factor) if level.part == "up" else None
            if share:
                n = math.ceil(share * len(level.layers) - 1e-9)
                graft.extend(level.layers[len(level.layers) - n:])
        if not graft and "graft_layers" not in changes and "graft_layer_names" not in changes:
            raise ValueError("unet has no decoder attention at 1/4, 1/2 or 1/1 of the latent side, "
                             "so the paper's layer rule picks no TriAG layer; pass graft_layers")
        every = [i for level in levels for i in level.layers]
        base = dict(graft_layers=tuple(graft), qgraft_layers=tuple(every),
                    dae_layers=tuple(i for level in levels if level.cross for i in level.layers))
        base.update(changes)
        return cls(**base)

    def describe_layers(self) -> str:
        """The layers each phase acts on, e.g. ``"TriAG 9-15; Q graft 0-15; DAE 0-15"``."""
        triag = _ranges(self.graft_layers)
        if self.graft_layer_names:
            triag += " + " + ", ".join(self.graft_layer_names)
        return f"TriAG {triag}; Q graft {_ranges(self.qgraft_layers)}; DAE {_ranges(self.dae_layers)}"

    @classmethod
    def disabled(cls, **changes: Any) -> "GraftConfig":
        """Everything off: every processor behaves as diffusers' ``AttnProcessor2_0``."""
        base = dict(graft_layers=(), graft_steps=None, qgraft_layers=(), qgraft_steps=None,
                    dae_layers=(), dae_steps=None, fg_gain=1.0, dae_gain=1.0)
        base.update(changes)
        return cls(**base)

    def replace(self, **changes: Any) -> "GraftConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-serialisable settings (for manifests)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    # ---- windows -------------------------------------------------------------------------------
    @staticmethod
    def step_range(window: Window, num_steps: int) -> range:
        """The step indices a window covers in a schedule of ``num_steps`` steps."""
        if not is_int(num_steps) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        window = _norm_window("window", window)
        if window is None:
            return range(0)
        a, b = window
        if isinstance(a, float):
            a, b = math.floor(num_steps * a + 1e-9), math.floor(num_steps * b + 1e-9)
        return range(min(a, num_steps), min(b, num_steps))

    def plan(self, step: int, num_steps: int) -> StepPlan:
        """Which phases are active at ``step`` (0-based) of ``num_steps``."""
        if not is_int(num_steps) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if not is_int(step) or not 0 <= step < num_steps:
            raise ValueError(f"step must be an int in [0, {num_steps}), got {step!r}")
        qgraft = bool(self.qgraft_layers) and step in self.step_range(self.qgraft_steps, num_steps)
        graft = bool(self.graft_layers or self.graft_layer_names) and \
            step in self.step_range(self.graft_steps, num_steps)
        gain_on = self.fg_gain_steps is None or step in self.step_range(self.fg_gain_steps, num_steps)
        dae = bool(self.dae_layers) and self.dae_gain != 1.0 and step in self.step_range(self.dae_steps,
                                                                                           num_steps)
        return StepPlan(step, num_steps, qgraft, graft, self.fg_gain if gain_on else 1.0, dae)

    def self_mode(self, plan: Optional[StepPlan], index: int, name: str) -> Optional[str]:
        """'qgraft', 'graft' or None (ordinary attention) for a self-attention layer at ``plan``."""
        if plan is None:
            return None
        if plan.qgraft and index in self.qgraft_layers:
            return "qgraft"
        if plan.graft and (index in self.graft_layers or name in self.graft_layer_names):
            return "graft"
        return None

    def dae_on(self, plan: Optional[StepPlan], index: int) -> bool:
        return plan is not None and plan.dae and index in self.dae_layers

    def schedule(self, num_steps: int) -> Dict[str, list]:
        """Step indices of each window for ``num_steps`` (for logs and manifests). Where the Q-graft
        and TriAG windows overlap, a layer in both runs the Q graft (see :meth:`self_mode`)."""
        plans = [self.plan(i, num_steps) for i in range(num_steps)]
        return {
            "qgraft": [p.step for p in plans if p.qgraft],
            "graft": [p.step for p in plans if p.graft],
            "fg_gain": [p.step for p in plans if p.graft and p.fg_gain != 1.0],
            "dae": [p.step for p in plans if p.dae],
        }
