"""Generation on every process a launcher started (``accelerate launch``, ``torchrun``), or on one.

How the work is split (``o2mag generate`` and ``o2mag dataset`` both run :func:`run_groups`):

- Process state comes from accelerate (:class:`ProcessState` wraps ``accelerate.PartialState``):
  rank, number of processes, the GPU of this process. Run as a plain command it is one process.
- Process 0 reads every output folder once and sends all processes the same *plan*: per output
  folder (a *group*: one category and defect type) the missing indices, cut into the batches a
  one-process run would make (per reference/normal pair, ``--batch-size`` at a time). Because a
  sample's picture depends on what shares its UNet batch (to the last bit, not beyond float
  rounding), every process keeps these batches whole: a two-process run writes the same files
  as a one-process run.
- Processes start on different groups (process r at group ``r * G // k``) and move on in turn,
  so with many groups each process mostly does whole groups (one AGO and inversion per reference).
  Inside a group a process claims the next ``ceil(available / 2k)`` batches of one
  reference/normal pair at a time (shrinking chunks keep everyone busy to the end), then goes on
  with the pair's following batches in the same ``generate_iter`` call for as long as it can
  claim each one whole just before computing it. A lone process thus makes a pair in one call,
  as a one-process run does (the K/V cache is recorded once), and it helps with other groups
  until nothing is left to claim. Claims are per sample on the filesystem
  (:meth:`o2mag.runs.store.OutputStore.claim`), so the processes of one launch, and independent runs
  with the same settings, never make a sample twice; a batch is claimed whole or not at all.
- Computing one image's AGO embedding or inversion is done under a lease in the cache folder:
  a second process that needs it waits and then reads it from the disk cache instead of
  computing (and writing) it again.
- At the end the processes meet once (``gather``) so process 0 can report totals.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..errors import ClaimLostError
from .claims import Holder, Leases
from .store import OutputStore

__all__ = ["ProcessState", "process_state", "Batch", "plan_batches", "rotation", "chunk_size", "available",
           "claim_batch", "Group", "Reference", "Options", "GroupResult", "run_groups"]

_LAUNCH_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# A process that finished waits for the others at the end: as long as a last chunk takes, or a
# slow model load at the start. torch's 30-minute default is too short for big models on NFS.
_COLLECTIVE_TIMEOUT = timedelta(hours=12)


# --------------------------------------------------------------------------------- process state
@dataclass
class ProcessState:
    """Which process this is: ``index`` of ``count`` (``local_index`` on its machine), and the
    device accelerate chose for it (None when not launched as several processes)."""

    index: int = 0
    count: int = 1
    local_index: int = 0
    device: Any = None
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def distributed(self) -> bool:
        return self.count > 1

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process (picklable)."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list  # deferred: only under a launcher (slow import)

        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist  # deferred: only under a launcher

        out: List[Any] = [None] * self.count
        dist.all_gather_object(out, obj)
        return out


def _launched() -> bool:
    for name in _LAUNCH_VARS:
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def process_state(cpu: bool) -> ProcessState:
    """This process's place in the launch. ``cpu``: the processes run on the CPU (gloo) rather
    than one GPU each (nccl). A plain command (no launcher) is process 0 of 1 and starts nothing."""
    if not _launched():
        return ProcessState()
    from accelerate import PartialState  # deferred: only under a launcher (slow import)

    state = PartialState(cpu=cpu, timeout=_COLLECTIVE_TIMEOUT)
    return ProcessState(index=state.process_index, count=state.num_processes,
                        local_index=state.local_process_index, device=state.device, _state=state)


# ------------------------------------------------------------------------------------ work split
@dataclass(frozen=True)
class Batch:
    """One UNet batch of targets: all share reference ``pair[0]`` and normal ``pair[1]``."""

    pair: Tuple[int, int]
    indices: Tuple[int, ...]


def plan_batches(todo: Sequence[int], pair_of: Callable[[int], Tuple[int, int]],
                 batch_size: int) -> List[Batch]:
    """The batches a one-process run makes: ``todo`` grouped by pair (in pair order), then cut
    into runs of ``batch_size`` in index order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by: Dict[Tuple[int, int], List[int]] = {}
    for i in sorted(todo):
        by.setdefault(pair_of(i), []).append(i)
    out = []
    for pair in sorted(by):
        idx = by[pair]
        out += [Batch(pair, tuple(idx[s:s + batch_size])) for s in range(0, len(idx), batch_size)]
    return out


def rotation(num_groups: int, rank: int, world: int) -> List[int]:
    """Group order of process ``rank``: start at ``rank * G // world``, then every other in turn."""
    if num_groups <= 0:
        return []
    start = (rank * num_groups) // max(world, 1)
    return [(start + j) % num_groups for j in range(num_groups)]


def chunk_size(available: int, world: int) -> int:
    """How many of the ``available`` batches of a pair one process claims at once: half of an even
    share, ``ceil(available / (2 * world))`` ("factoring" self-scheduling). Chunks shrink as the
    work runs out, so processes finish together, and there is always unclaimed work left for a
    process that comes later (an independent run into the same folder) until the very end."""
    return max(1, math.ceil(available / (2 * max(world, 1)))) if available > 0 else 0


def segments(batches: Sequence[Batch], batch_size: int) -> List[List[Batch]]:
    """Cut claimed batches into runs that ``generate_iter(batch_size=...)`` re-chunks exactly as
    given: a batch shorter than ``batch_size`` ends its run."""
    out: List[List[Batch]] = []
    cur: List[Batch] = []
    for b in batches:
        cur.append(b)
        if len(b.indices) < batch_size:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def available(plan: Sequence[Batch], others: Set[int],
              done: Callable[[int], bool]) -> List[Tuple[Batch, tuple]]:
    """``(batch, its samples not done)`` for each batch of ``plan`` that no other writer holds any
    sample of. A batch another process is claiming right now is partly held; taking its free
    part would cut the batch in two, so it is left whole to its claimer."""
    out = []
    for b in plan:
        if any(i in others for i in b.indices):
            continue
        free = tuple(i for i in b.indices if not done(i))
        if free:
            out.append((b, free))
    return out


def claim_batch(store, free: Sequence[int]) -> List[int]:
    """Claim the ``free`` indices of one batch, all or nothing: [] (and nothing held) when another
    writer holds one of them. Processes that start together race for the same batches; claiming
    in index order and giving up whole batches keeps every batch as planned (a batch cut in two
    would change its samples' pixels)."""
    got = store.claim(free)
    if any(i not in got and not store.done(i) for i in free):
        for i in got:
            store.release(i)
        return []
    return got


# ------------------------------------------------------------------------------------ the groups
@dataclass
class Reference:
    """A reference defect at the working size: ``image`` (PIL RGB) and its mask ``M_R`` (bool)."""

    name: str
    image: Any
    mask: np.ndarray


@dataclass
class Group:
    """One output folder: ``num`` samples of ``category``/``defect``.

    Sample ``i`` uses reference ``i % R`` and normal ``(i // R) % M`` (R references, M normals),
    so what it is made from depends on ``i`` alone. ``load()`` returns ``(references, normals)``
    at the working size (``normals``: PIL images), called when a process first works on the
    group. ``settings`` go to every manifest line and guard resumes; ``record_reference`` adds the
    sample's reference to its line (the dataset command, which has several)."""

    category: str
    defect: str
    num: int
    ref_names: List[str]
    normal_names: List[str]
    prompt: str
    word: str
    settings: Dict[str, Any]
    load: Callable[[], Tuple[List[Reference], List[Any]]]
    record_reference: bool = False

    @property
    def key(self) -> str:
        return f"{self.category}/{self.defect}"

    def pair(self, i: int) -> Tuple[int, int]:
        r = len(self.ref_names)
        return i % r, (i // r) % len(self.normal_names)


@dataclass
class Options:
    """How every group is made. ``settings``: the :class:`o2mag.pipeline.settings.GenerationSettings`
    handed to ``generate_iter`` (their ``batch_size`` also cuts the plan's batches, their ``seed``
    is recorded per sample; with ``cache_inversions_to_disk`` the processes share inversions).
    ``make_masks(ref_mask, normal_image, indices)`` returns the target masks
    (:class:`o2mag.masks.TargetMask`) of those sample indices. ``overwrite``: replace complete
    samples; ``lease``: seconds after which a dead process's claims are taken over."""

    settings: Any
    make_masks: Callable[[np.ndarray, Any, List[int]], List[Any]]
    overwrite: bool = False
    lease: float = 120.0


@dataclass
class GroupResult:
    """What happened to one group: ``wanted`` samples, ``present`` before the run (of 0..num-1),
    ``todo`` in the plan, ``made`` (all processes), generation ``seconds`` (summed over
    processes), ``complete`` after the run (filled in on process 0)."""

    key: str
    category: str
    defect: str
    wanted: int
    present: int
    todo: int
    references: int
    made: int = 0
    seconds: float = 0.0
    complete: Optional[int] = None
    dir: str = ""


@dataclass
class RunReport:
    """Totals of a run: per-group results and the pipeline's work counters summed over processes."""

    groups: List[GroupResult]
    stats: Dict[str, int] = field(default_factory=dict)
    processes: int = 1
    wall: float = 0.0
    per_process: List[int] = field(default_factory=list)  # samples made by each rank

    @property
    def made(self) -> int:
        return sum(g.made for g in self.groups)


def _digest(arr: np.ndarray) -> str:
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:24]


class _Progress:
    """Bars on process 0 only: all samples of the run, and the samples of the category it works on
    (other processes' samples included, read from the manifests every couple of seconds)."""

    def __init__(self, enabled: bool, groups: List[Group], stores, plan_todo: List[List[int]],
                 per_category: bool):
        self.enabled = enabled
        self.groups, self.stores, self.todo = groups, stores, plan_todo
        self.per_category = per_category
        self._last = 0.0
        self.overall = self.category_bar = None
        self.category = None
        if enabled:
            total = sum(len(t) for t in plan_todo)
            self.overall = tqdm(total=total, desc="all", unit="img", position=0, dynamic_ncols=True)

    def _count(self, gi: int) -> int:
        st = self.stores[gi]
        return sum(1 for i in self.todo[gi] if st.done(i))

    def enter(self, gi: int) -> None:
        if not self.enabled or not self.per_category:
            return
        cat = self.groups[gi].category
        if cat == self.category:
            return
        if self.category_bar is not None:
            self.category_bar.close()
        self.category = cat
        members = [j for j, g in enumerate(self.groups) if g.category == cat]
        self.category_bar = tqdm(total=sum(len(self.todo[j]) for j in members), desc=cat, unit="img",
                                 position=1, leave=False, dynamic_ncols=True)
        self.update(force=True)

    def status(self, text: str) -> None:
        if self.enabled:
            self.overall.set_postfix_str(text, refresh=True)

    def update(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 2.0:
            return
        self._last = now
        counts = []
        for gi, st in enumerate(self.stores):
            if self.todo[gi]:
                st.refresh()
            counts.append(self._count(gi) if self.todo[gi] else 0)
        self.overall.n = sum(counts)
        self.overall.refresh()
        if self.category_bar is not None:
            self.category_bar.n = sum(c for c, g in zip(counts, self.groups) if g.category == self.category)
            self.category_bar.refresh()

    def close(self) -> None:
        for bar in (self.category_bar, self.overall):
            if bar is not None:
                bar.close()


def run_groups(pipe, out: str | os.PathLike, groups: List[Group], opts: Options, state: ProcessState, *,
               progress: bool = True, per_category: bool = False,
               announce: Optional[Callable[[List[GroupResult], List[Any]], None]] = None) -> RunReport:
    """Make every missing sample of ``groups`` under ``out``, sharing the work with the other
    processes of ``state``. Returns the run's totals (complete on process 0).

    ``progress``: overall/category bars on process 0 (the pipeline's own bars are the caller's
    choice, ``pipe.progress``). ``announce(results, stores)`` is called on process 0 once the
    plan is known, before any work.
    """
    t_start = time.perf_counter()
    run = state.broadcast(uuid.uuid4().hex[:12] if state.is_main else None)
    stores: List[OutputStore] = []
    prep: Optional[Leases] = None
    bars: Optional[_Progress] = None
    try:
        for g in groups:
            stores.append(OutputStore(out, g.category, g.defect, overwrite=opts.overwrite,
                                      settings=g.settings, run=run, rank=state.index, lease=opts.lease))
        for st in stores:
            st.check_others()
        todo = state.broadcast([st.missing_indices(g.num) for st, g in zip(stores, groups)]
                               if state.is_main else None)
        settings = opts.settings
        plans = [plan_batches(t, g.pair, settings.batch_size) for t, g in zip(todo, groups)]
        results = [GroupResult(key=g.key, category=g.category, defect=g.defect, wanted=g.num,
                               present=g.num - len(t) if not opts.overwrite else
                               sum(1 for i in range(g.num) if st._complete(i)),
                               todo=len(t), references=len(g.ref_names), dir=str(st.dir))
                   for g, t, st in zip(groups, todo, stores)]
        if state.is_main and announce is not None:
            announce(results, stores)
        cache_dir = getattr(pipe, "cache_dir", None)
        if cache_dir:
            prep = Leases(Path(cache_dir) / "locks", Holder(run=run, rank=state.index), opts.lease)
        bars = _Progress(progress and state.is_main and any(todo), groups, stores, todo, per_category)
        loaded: Dict[int, Tuple[List[Reference], List[Any]]] = {}
        masks_of: Dict[int, Any] = {}  # target masks of the current group, by sample index
        current: List[Optional[int]] = [None]

        def inputs(gi: int):
            if current[0] != gi:
                loaded.clear()
                masks_of.clear()
                if current[0] is not None and hasattr(pipe, "clear_caches"):
                    pipe.clear_caches()  # inversions live on the device: keep one group's at a time
                current[0] = gi
            if gi not in loaded:
                loaded[gi] = groups[gi].load()
            return loaded[gi]

        def warm(gi: int, ref: Reference, normal) -> None:
            """AGO and both inversions, each computed by one process while others wait for it."""
            g = groups[gi]
            ref_arr = np.asarray(ref.image.convert("RGB"), dtype=np.uint8)
            nor_arr = np.asarray(normal.convert("RGB"), dtype=np.uint8)
            jobs = [(ref_arr, True), (nor_arr, False)]
            for arr, is_ref in jobs:
                name = "prep-" + _digest(arr)
                if prep is not None:
                    prep.acquire(name, on_wait=lambda: bars.status(f"{g.key}: waiting for another process's "
                                                                   "AGO/inversion"))
                try:
                    if is_ref and settings.ago_steps:
                        bars.status(f"{g.key}: AGO")
                        pipe.optimize_embedding(ref_arr, g.prompt, steps=settings.ago_steps, lr=settings.ago_lr,
                                                mask=ref.mask if settings.ago_mask_weight else None,
                                                seed=settings.seed)
                    bars.status(f"{g.key}: inversion")
                    pipe.invert(arr, settings.num_inference_steps, cache_to_disk=True,
                                desc="DDIM inversion (reference)" if is_ref else "DDIM inversion (normal)")
                finally:
                    if prep is not None:
                        prep.release(name)

        made = [0] * len(groups)
        seconds = [0.0] * len(groups)

        def target_masks(ref: Reference, normal, indices: List[int]) -> List[Any]:
            missing = [i for i in indices if i not in masks_of]
            if missing:
                masks_of.update(zip(missing, opts.make_masks(ref.mask, normal, missing)))
            return [masks_of[i] for i in indices]

        def generate(gi: int, seq: List[Tuple[Batch, bool]]) -> None:
            """Make the batches of ``seq`` (one pair, plan order; ``True`` = already claimed) in as few
            ``generate_iter`` calls as the batch boundaries allow. A batch not yet claimed is claimed
            (whole) just before it is computed; if that fails, the call stops there: so a lone
            process runs one call per pair, as a one-process run does (the K/V cache is recorded
            once), and processes that share a pair split it where their claims meet."""
            g, st = groups[gi], stores[gi]
            refs, normals = inputs(gi)
            r, n = seq[0][0].pair
            ref, normal = refs[r], normals[n]
            t0 = time.perf_counter()
            warm(gi, ref, normal)
            try:
                for seg in segments([b for b, _ in seq], settings.batch_size):
                    claimed = {b: c for b, c in seq if b in seg}
                    if not claimed[seg[0]]:
                        if claim_batch(st, seg[0].indices) != list(seg[0].indices):
                            return
                        claimed[seg[0]] = True
                    indices = [i for b in seg for i in b.indices]
                    ends = {}  # index of a batch's last sample -> the batch that follows it
                    for a, b in zip(seg, seg[1:]):
                        ends[a.indices[-1]] = b
                    targets = target_masks(ref, normal, indices)
                    bars.status(f"{g.key}: {len(indices)} sample(s)")
                    gen = pipe.generate_iter(ref.image, ref.mask, normal, [t.mask for t in targets], g.prompt,
                                             g.word, **settings.keywords())
                    try:
                        for j, image, mask in gen:
                            i = indices[j]
                            record = {"seed": [settings.seed, i], "normal": g.normal_names[n],
                                      "mask_params": targets[j].params}
                            if g.record_reference:
                                record["reference"] = g.ref_names[r]
                            try:
                                st.write(i, image, np.asarray(mask) > 127, record)
                                made[gi] += 1
                            except ClaimLostError as e:
                                print(f"o2mag: warning: {e}", file=sys.stderr)
                            bars.update()
                            nxt = ends.get(i)
                            if nxt is not None and not claimed[nxt]:  # before the next batch is computed
                                if claim_batch(st, nxt.indices) != list(nxt.indices):
                                    return
                                claimed[nxt] = True
                    finally:
                        gen.close()
            finally:
                seconds[gi] += time.perf_counter() - t0

        def work_on(gi: int) -> bool:
            """Claim and make batches of group ``gi`` until none is left to claim; True if any."""
            st, did = stores[gi], False
            while True:
                st.refresh()
                others = st.claimed_by_others()
                avail = available(plans[gi], others, st.done)
                if not avail:
                    return did
                pair = avail[0][0].pair
                same = [(b, free) for b, free in avail if b.pair == pair]
                take = chunk_size(len(same), state.count)
                seq: List[Tuple[Batch, bool]] = []
                try:
                    for b, free in same[:take]:
                        got = claim_batch(st, free)
                        if got:
                            seq.append((Batch(pair, tuple(got)), True))
                    if seq:  # the rest of the pair, claimed on the way if still free then
                        seq += [(Batch(pair, free), False) for b, free in same[take:]]
                        did = True
                        bars.enter(gi)
                        generate(gi, seq)
                finally:
                    for b, _ in seq:
                        for i in b.indices:
                            st.release(i)  # no-op for the written ones and those never claimed

        order = [gi for gi in rotation(len(groups), state.index, state.count) if plans[gi]]
        while order:  # until a whole pass finds nothing to claim (claims of dead processes expire)
            if not any([work_on(gi) for gi in order]):
                break
        bars.update(force=True)
        mine = {"made": made, "seconds": seconds, "stats": dict(pipe.stats.as_dict())
                if hasattr(pipe, "stats") else {}}
        everyone = state.gather(mine)
        for gi, res in enumerate(results):
            res.made = sum(e["made"][gi] for e in everyone)
            res.seconds = sum(e["seconds"][gi] for e in everyone)
        stats: Dict[str, int] = {}
        for e in everyone:
            for k, v in e["stats"].items():
                stats[k] = stats.get(k, 0) + v
        if state.is_main:
            for gi, (res, st) in enumerate(zip(results, stores)):
                st.refresh(check=False)
                res.complete = sum(1 for i in range(groups[gi].num) if st._complete(i))
        return RunReport(groups=results, stats=stats, processes=state.count,
                         wall=time.perf_counter() - t_start, per_process=[sum(e["made"]) for e in everyone])
    finally:
        if bars is not None:
            bars.close()
        for st in stores:
            st.close()
        if prep is not None:
            prep.release_all()
