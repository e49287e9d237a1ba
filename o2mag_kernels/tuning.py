"""Which tile configs of the fused kernel may run on a GPU, and whether ``auto`` may pick it.

Two kinds of evidence, kept apart because they prove different things:

* **compiles cleanly** (``SPILL_FREE``): ``o2mag-kernels aot-check`` compiles every config for
  sm_80 and sm_90 without a GPU and fails on any register spill, shared-memory overflow or missing
  tensor-core instruction. It cannot see a miscompiled kernel that faults or computes wrong values
  on the card (Triton >= 3.6 had such faults on Hopper).
* **ran correctly on a card** (sweeps): ``o2mag-kernels gpu-sweep`` runs every spill-free config
  x head dim x dtype x mask kind in its own process on a GPU, against the float64 reference, and
  writes ``o2mag_kernels/sweeps/<card>.json``. A sweep counts only for the kernel source it ran on
  (its ``kernel_hash``): any change to the kernel makes it stale.

The configs allowed on a GPU family (sm_8x, sm_9x, ...) are the spill-free ones that passed every
case in the committed sweeps of that family; a family never swept gets those that passed in every
sweep of every family; with no valid sweep at all, the spill-free configs (unproven, so ``auto``
does not pick the kernel there; set ``O2MAG_TRITON=on`` to opt in, ``off`` to never pick it).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from typing import Dict, FrozenSet, List, Optional, Tuple

from . import _triton_kernel as K

SWEEP_DIR = os.path.join(os.path.dirname(__file__), "sweeps")
Config = Tuple[int, int, int, int]
_ALL = frozenset(K.CONFIGS)


def _but(*drop) -> FrozenSet[Config]:
    return frozenset(c for c in K.CONFIGS if c not in drop)


def _only(*keep) -> FrozenSet[Config]:
    return frozenset(keep)


# (SM family, dtype class, head-dim bucket) -> configs that compile with no spill (aot-check
# proves every entry for sm_80 and sm_90 and fails if one spills; configs that spilled are removed
# here). sm_80's mma.sync keeps operands in registers, so it is tighter than sm_90's wgmma.
SPILL_FREE: Dict[Tuple[int, str, int], FrozenSet[Config]] = {
    (family, kind, d): _ALL
    for family in (80, 90) for kind in ("half", "fp32") for d in K.HEAD_DIMS
}


def family(arch: int) -> int:
    """SM family of an architecture number (86 -> 80, 90 -> 90, 100 -> 100)."""
    return 10 * (arch // 10)


def _aot_family(arch: int) -> int:
    """The AOT-checked family whose register budget applies (sm_80 for 8.x, sm_90 above)."""
    return 90 if arch >= 90 else 80


def spill_free(head_dim: int, itemsize: int, arch: int) -> List[Config]:
    """Configs (in CONFIGS order) that compile without spills for this head dim, dtype and SM."""
    ok = SPILL_FREE.get((_aot_family(arch), K.dtype_class(itemsize), K.head_dim_bucket(head_dim)),
                        frozenset())
    return [c for c in K.CONFIGS if c in ok]


def kernel_hash() -> str:
    """Hash of the kernel's Triton source (every @triton.jit function of ``_triton_kernel``)."""
    h = hashlib.sha256()
    for name in sorted(vars(K)):
        fn = getattr(K, name)
        src = getattr(fn, "src", None)
        if isinstance(src, str) and hasattr(fn, "arg_names"):
            h.update(name.encode())
            h.update(src.encode())
    for c in K.CONFIGS:
        h.update(repr(c).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def load_sweeps(directory: str = SWEEP_DIR) -> Tuple[dict, ...]:
    """Every committed sweep file, each a dict with ``valid`` (its kernel hash is this kernel's)."""
    out = []
    current = kernel_hash()
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        data["path"] = path
        data["valid"] = data.get("kernel_hash") == current and not data.get("interpreted")
        out.append(data)
    return tuple(out)


def _passed(sweep: dict) -> Dict[Tuple[str, int], Dict[Config, float]]:
    """(dtype class, head-dim bucket) -> {config that passed every case: its median time in ms
    on the timed case (inf when not timed)}."""
    ok: Dict[Tuple[str, int, Config], bool] = {}
    ms: Dict[Tuple[str, int, Config], float] = {}
    for r in sweep.get("results", []):
        kind = "fp32" if r["dtype"] == "fp32" else "half"
        key = (kind, K.head_dim_bucket(int(r["head_dim"])), tuple(r["config"]))
        ok[key] = ok.get(key, True) and r.get("status") == "ok"
        if "ms" in r:
            ms[key] = max(ms.get(key, 0.0), float(r["ms"]))
    table: Dict[Tuple[str, int], Dict[Config, float]] = {}
    for (kind, d, cfg), good in ok.items():
        if good:
            table.setdefault((kind, d), {})[cfg] = ms.get((kind, d, cfg), float("inf"))
    return table


def _family_sweeps(arch: int, sweeps=None):
    sweeps = load_sweeps() if sweeps is None else sweeps
    valid = [s for s in sweeps if s["valid"]]
    mine = [s for s in valid if family(10 * s["capability"][0] + s["capability"][1]) == family(arch)]
    return mine, valid


def proven(head_dim: int, itemsize: int, arch: int, sweeps=None) -> Optional[List[Config]]:
    """Configs hardware-proven for this head dim/dtype on ``arch``'s family (see module doc),
    fastest first by the sweeps' timings, or None when no valid sweep exists at all."""
    mine, valid = _family_sweeps(arch, sweeps)
    use = mine or valid
    if not use:
        return None
    key = (K.dtype_class(itemsize), K.head_dim_bucket(head_dim))
    ok = set(spill_free(head_dim, itemsize, arch))
    speed: Dict[Config, float] = {}
    for s in use:
        got = _passed(s).get(key, {})
        ok &= set(got)
        for c, t in got.items():
            speed[c] = max(speed.get(c, 0.0), t)
    order = {c: i for i, c in enumerate(K.CONFIGS)}
    return sorted(ok, key=lambda c: (speed.get(c, float("inf")), order[c]))


def allowed_configs(head_dim: int, itemsize: int = 2, arch: int = 90, sweeps=None) -> List[Config]:
    """The configs the autotuner may pick: proven ones when a valid sweep exists, else the
    spill-free ones (unproven)."""
    p = proven(head_dim, itemsize, arch, sweeps)
    return spill_free(head_dim, itemsize, arch) if p is None else p


def trusted(capability: Tuple[int, int], sweeps=None) -> Tuple[bool, str]:
    """Whether ``auto`` may pick the kernel on a GPU of this capability, and why (not)."""
    setting = os.environ.get("O2MAG_TRITON", "auto").lower()
    if setting == "off":
        return False, "O2MAG_TRITON=off"
    arch = 10 * capability[0] + capability[1]
    mine, _ = _family_sweeps(arch, sweeps)
    if mine:
        return True, f"proven on sm_{family(arch) // 10}x by {len(mine)} committed sweep(s)"
    if setting == "on":
        return True, "O2MAG_TRITON=on (configs not proven on this GPU family)"
    return False, (f"no committed hardware sweep of this kernel on sm_{family(arch) // 10}x "
                   "(run `o2mag-kernels gpu-sweep`, or set O2MAG_TRITON=on to use it anyway)")


def describe(capability: Tuple[int, int]) -> str:
    ok, why = trusted(capability)
    return ("auto picks it: " if ok else "auto does not pick it: ") + why


TOP_K = 3  # with sweep timings, the autotuner times only this many of the fastest configs


def prune(head_dim: int, lq: int, lk: int, itemsize: int = 2, arch: int = 90,
          sweeps=None) -> List[Config]:
    """The configs worth timing for one call: allowed for the head dim/dtype/SM, no tile much
    larger than the problem (``lq``/``lk`` are bucketed lengths), and -- when a sweep timed them
    -- the TOP_K fastest (fewer first-call compiles)."""
    fits = allowed_configs(head_dim, itemsize, arch, sweeps)
    out = [c for c in fits if c[0] <= max(64, lq) and c[1] <= max(64, lk)] or fits[-1:]
    if proven(head_dim, itemsize, arch, sweeps) is not None:
        out = out[:TOP_K]
    return out


def all_variants(head_dims=K.HEAD_DIMS, itemsize: int = 2, arch: int = 80):
    """Every (head_dim bucket, config) pair that aot-check compiles for this SM family."""
    return [(d, cfg) for d in head_dims for cfg in spill_free(d, itemsize, arch)]
