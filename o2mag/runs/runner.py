"""Generation on every process a launcher started (``accelerate launch``, ``torchrun``), or on one.

How the work is split (``o2mag generate`` and ``o2mag dataset`` both run a :class:`Runner`):

- Process state comes from accelerate (:mod:`o2mag.runs.processes`): rank, number of processes,
  the GPU of this process. Run as a plain command it is one process.
- Process 0 reads every output folder once and sends all processes the same *plan*: per output
  folder (a *group*: one category and defect type) the missing indices, cut into the batches a
  one-process run would make (per reference/normal pair, ``--batch-size`` at a time;
  :mod:`o2mag.runs.plan`). Because a sample's picture depends on what shares its UNet batch (to
  the last bit, not beyond float rounding), every process keeps these batches whole: a
  two-process run writes the same files as a one-process run.
- Processes start on different groups (process r at group ``r * G // k``) and move on in turn,
  so with many groups each process mostly does whole groups (one AGO and inversion per reference).
  Inside a group a process claims the next ``ceil(available / 2k)`` batches of one
  reference/normal pair at a time (shrinking chunks keep everyone busy to the end), then goes on
  with the pair's following batches in the same ``generate_iter`` call for as long as it can
  claim each one whole just before computing it. A lone process thus makes a pair in one call,
  as a one-process run does (the K/V cache is recorded once), and it helps with other groups
  until nothing is left to claim; then it waits while other writers still hold samples of the plan
  (they finish them, or their claims go stale and it takes them over). Claims are per sample on the filesystem
  (:meth:`o2mag.runs.store.OutputStore.claim`), so the processes of one launch, and independent runs
  with the same settings, never make a sample twice; a batch is claimed whole or not at all.
- The pipeline computes each AGO embedding and inversion it does not find in its cache under a
  lease in the cache folder (the lock :class:`CacheLeases` hands the pipeline's cache): a second
  process that needs the same result waits and then reads it from the disk cache instead of
  computing (and writing) it again.
- Before anything is written or computed, every process reads each group's inputs and draws
  the target masks of each reference/normal pair's first sample (:meth:`Runner.check_inputs`), so
  a bad input stops the run before the first model call.
- At the end the processes meet once (``gather``) so process 0 can report totals.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..sample_quality import sample_quality
from ..errors import ClaimLostError, InputError
from .claims import Holder, Leases, describe
from .plan import Batch, available, chunk_size, claim_batch, plan_batches, rotation, segments
from .processes import ProcessState
from .store import OutputStore

__all__ = ["Reference", "Group", "RunOptions", "GroupResult", "RunReport", "Progress", "CacheLeases", "Runner",
           "run_groups"]


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
class RunOptions:
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
    processes), ``complete`` after the run and ``held`` (missing samples claimed by another live
    run: who holds them) (filled in on process 0)."""

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
    held: Dict[int, str] = field(default_factory=dict)  # missing samples claimed by another live run


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


class Progress:
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


class CacheLeases:
    """The lock a run hands the pipeline's cache (``pipe.cache_lock``): a lease per result in
    ``<cache_dir>/locks/``, held while one process computes an AGO embedding or an inversion, so
    the others wait and then read it from the disk cache. ``status(text)`` shows what is running
    (None: what was shown before)."""

    WHAT = {"embeddings": "AGO", "inversions": "inversion"}

    def __init__(self, leases: Leases, status: Callable[[Optional[str]], None]):
        self.leases = leases
        self.status = status

    @contextlib.contextmanager
    def __call__(self, kind: str, key: str) -> Iterator[None]:
        what = self.WHAT.get(kind, kind)
        name = f"{kind}-{key}"
        self.leases.acquire(name, on_wait=lambda: self.status(f"waiting for another process's {what}"))
        try:
            self.status(what)
            yield
        finally:
            self.leases.release(name)
            self.status(None)


class Runner:
    """Make every missing sample of ``groups`` under ``out``, sharing the work with the other
    processes of ``state`` (see the module docstring); :meth:`run` returns the run's totals
    (complete on process 0).

    ``progress``: overall/category bars on process 0 (the pipeline's own bars are the caller's
    choice, ``pipe.progress``). ``announce(results, stores)`` is called on process 0 once the plan
    is known, before any work.
    """

    def __init__(self, pipe, out: str | os.PathLike, groups: List[Group], opts: RunOptions, state: ProcessState,
                 *, progress: bool = True, per_category: bool = False,
                 announce: Optional[Callable[[List[GroupResult], List[OutputStore]], None]] = None):
        self.pipe, self.out, self.groups, self.opts, self.state = pipe, out, groups, opts, state
        self.settings = opts.settings
        self.progress, self.per_category, self.announce = progress, per_category, announce
        self.stores: List[OutputStore] = []
        self.plans: List[List[Batch]] = []
        self.results: List[GroupResult] = []
        self.bars: Optional[Progress] = None
        self.prep: Optional[Leases] = None  # leases on AGO/inversion work in the cache folder
        self.current: Optional[int] = None  # the group whose inputs and target masks are held
        self.loaded: Optional[Tuple[List[Reference], List[Any]]] = None
        self.masks_of: Dict[int, Any] = {}  # target masks of the current group, by sample index
        self.status_text = ""  # what the bars show between AGO/inversion phases
        self.made = [0] * len(groups)
        self.seconds = [0.0] * len(groups)
        self.said_waiting = False

    # ------------------------------------------------------------------------------- the run
    def run(self) -> RunReport:
        t_start = time.perf_counter()
        state = self.state
        run = state.broadcast(uuid.uuid4().hex[:12] if state.is_main else None)
        lock_before = self.pipe.cache_lock
        try:
            self.check_inputs()
            self._plan(run)
            cache_dir = self.pipe.cache_dir
            if cache_dir:
                self.prep = Leases(Path(cache_dir) / "locks", Holder(run=run, rank=state.index), self.opts.lease)
                self.pipe.cache_lock = CacheLeases(self.prep, self._status)
            order = [gi for gi in rotation(len(self.groups), state.index, state.count) if self.plans[gi]]
            while order:  # until a whole pass finds nothing to claim and no live writer holds a sample
                if not any([self._work_on(gi) for gi in order]) and not self._wait_for_others(order):
                    break
            self.bars.update(force=True)
            return self._report(t_start)
        finally:
            self.pipe.cache_lock = lock_before
            if self.bars is not None:
                self.bars.close()
            for st in self.stores:
                st.close()
            if self.prep is not None:
                self.prep.release_all()

    def check_inputs(self) -> None:
        """Read and check every group's inputs before anything is written or computed: load its
        references and normals, and draw the target masks of the first sample of each
        reference/normal pair (sample ``i < R*M`` is the first of pair ``(i % R, i // R)``).

        What fails for every sample of a pair -- an unreadable image, an empty or unreadable mask
        or foreground, a reference mask that fits nowhere on the object, a mask folder without
        masks -- thus fails here, before the first model call and before any output folder is
        made; every process checks (the inputs are the same for all, so all stop alike). A draw
        that fails by chance for one later sample only (a rejection sampler's ``max_tries``) can
        still stop a run midway; complete samples are kept."""
        for g in self.groups:
            try:
                refs, normals = g.load()
                for i in range(min(g.num, len(g.ref_names) * len(g.normal_names))):
                    r, n = g.pair(i)
                    self.opts.make_masks(refs[r].mask, normals[n], [i])
            except InputError as e:
                if len(self.groups) == 1:
                    raise
                raise type(e)(f"{g.key}: {e}") from None

    def _plan(self, run: str) -> None:
        """Open every group's store, agree on the plan (process 0's view of what is missing),
        announce it and open the bars."""
        state, opts = self.state, self.opts
        for g in self.groups:
            self.stores.append(OutputStore(self.out, g.category, g.defect, overwrite=opts.overwrite,
                                           settings=g.settings, run=run, rank=state.index, lease=opts.lease))
        for st in self.stores:
            st.check_others()
        todo = state.broadcast([st.missing_indices(g.num) for st, g in zip(self.stores, self.groups)]
                               if state.is_main else None)
        self.plans = [plan_batches(t, g.pair, self.settings.batch_size) for t, g in zip(todo, self.groups)]
        self.results = [GroupResult(key=g.key, category=g.category, defect=g.defect, wanted=g.num,
                                    present=g.num - len(t) if not opts.overwrite else
                                    sum(1 for i in range(g.num) if st.is_complete(i)),
                                    todo=len(t), references=len(g.ref_names), dir=str(st.dir))
                        for g, t, st in zip(self.groups, todo, self.stores)]
        if state.is_main and self.announce is not None:
            self.announce(self.results, self.stores)
        self.bars = Progress(self.progress and state.is_main and any(todo), self.groups, self.stores, todo,
                             self.per_category)

    def _report(self, t_start: float) -> RunReport:
        """Meet the other processes once and add up what everyone made."""
        mine = {"made": self.made, "seconds": self.seconds, "stats": dict(self.pipe.stats.as_dict())}
        everyone = self.state.gather(mine)
        for gi, res in enumerate(self.results):
            res.made = sum(e["made"][gi] for e in everyone)
            res.seconds = sum(e["seconds"][gi] for e in everyone)
        stats: Dict[str, int] = {}
        for e in everyone:
            for k, v in e["stats"].items():
                stats[k] = stats.get(k, 0) + v
        if self.state.is_main:
            for gi, (res, st) in enumerate(zip(self.results, self.stores)):
                st.refresh(check=False)
                res.complete = sum(1 for i in range(self.groups[gi].num) if st.is_complete(i))
                if res.complete < res.wanted:
                    res.held = {int(name): describe(rec) for name, rec in st.leases.live().items()
                                if name.isdigit() and rec.get("run") != st.holder.run
                                and not st.is_complete(int(name)) and int(name) < res.wanted}
        return RunReport(groups=self.results, stats=stats, processes=self.state.count,
                         wall=time.perf_counter() - t_start, per_process=[sum(e["made"]) for e in everyone])

    def _wait_for_others(self, order: List[int]) -> bool:
        """Nothing left to claim: if live writers (this run's other processes, or another run with
        the same settings) still hold samples of the plan, wait a moment and return True (the
        caller looks again: their samples get done, or their claims go stale and are taken over);
        False when none does, so a run ends only with its samples done or not claimable at all."""
        waiting, holders = 0, set()
        for gi in order:
            st = self.stores[gi]
            st.refresh()
            planned = {i for b in self.plans[gi] for i in b.indices if not st.done(i)}
            held = {n: rec for n, rec in st.leases.check_live().items()
                    if n.isdigit() and int(n) in planned and rec.get("token") != st.holder.token}
            waiting += len(held)
            holders |= {describe(rec) for rec in held.values() if rec.get("run") != st.holder.run}
        if not waiting:
            return False
        if holders and not self.said_waiting:  # another run's: say so once (this run's ranks: silent)
            self.said_waiting = True
            print(f"o2mag: waiting for {waiting} sample(s) that another live o2mag run is making "
                  f"({'; '.join(sorted(holders))}); Ctrl-C stops this run, rerunning later finishes them",
                  file=sys.stderr)
        self.status_text = f"waiting for {waiting} sample(s) another process is making"
        self.bars.status(self.status_text)
        time.sleep(min(1.0, self.opts.lease / 6))
        return True

    # ------------------------------------------------------------------------------- a group
    def _status(self, text: Optional[str]) -> None:
        """Show ``text`` for the current group on the bars (None: back to the batch's status)."""
        key = self.groups[self.current].key if self.current is not None else ""
        self.bars.status(self.status_text if text is None else f"{key}: {text}")

    def _inputs(self, gi: int) -> Tuple[List[Reference], List[Any]]:
        """The references and normals of group ``gi``, loaded when a process first works on it."""
        if self.current != gi:
            self.loaded = None
            self.masks_of.clear()
            if self.current is not None:
                self.pipe.clear_caches()  # inversions live on the device: keep one group's at a time
            self.current = gi
        if self.loaded is None:
            self.loaded = self.groups[gi].load()
        return self.loaded

    def _target_masks(self, ref: Reference, normal, indices: List[int]) -> List[Any]:
        missing = [i for i in indices if i not in self.masks_of]
        if missing:
            self.masks_of.update(zip(missing, self.opts.make_masks(ref.mask, normal, missing)))
        return [self.masks_of[i] for i in indices]

    def _work_on(self, gi: int) -> bool:
        """Claim and make batches of group ``gi`` until none is left to claim; True if any."""
        st, did = self.stores[gi], False
        while True:
            st.refresh()
            others = st.claimed_by_others()
            avail = available(self.plans[gi], others, st.done)
            if not avail:
                return did
            pair = avail[0][0].pair
            same = [(b, free) for b, free in avail if b.pair == pair]
            take = chunk_size(len(same), self.state.count)
            seq: List[Tuple[Batch, bool]] = []
            try:
                for b, free in same[:take]:
                    got = claim_batch(st, free)
                    if got:
                        seq.append((Batch(pair, tuple(got)), True))
                if seq:  # the rest of the pair, claimed on the way if still free then
                    seq += [(Batch(pair, free), False) for b, free in same[take:]]
                    did = True
                    self.bars.enter(gi)
                    self._generate(gi, seq)
            finally:
                for b, _ in seq:
                    for i in b.indices:
                        st.release(i)  # no-op for the written ones and those never claimed

    def _generate(self, gi: int, seq: List[Tuple[Batch, bool]]) -> None:
        """Make the batches of ``seq`` (one pair, plan order; ``True`` = already claimed) in as few
        ``generate_iter`` calls as the batch boundaries allow. A batch not yet claimed is claimed
        (whole) just before it is computed; if that fails, the call stops there: so a lone
        process runs one call per pair, as a one-process run does (the K/V cache is recorded
        once), and processes that share a pair split it where their claims meet."""
        st = self.stores[gi]
        refs, normals = self._inputs(gi)
        r, n = seq[0][0].pair
        ref, normal = refs[r], normals[n]
        claimed = dict(seq)
        t0 = time.perf_counter()
        try:
            for seg in segments([b for b, _ in seq], self.settings.batch_size):
                if not claimed[seg[0]]:
                    if claim_batch(st, seg[0].indices) != list(seg[0].indices):
                        return
                    claimed[seg[0]] = True
                if not self._segment(gi, seg, ref, normal, claimed):
                    return
        finally:
            self.seconds[gi] += time.perf_counter() - t0

    def _segment(self, gi: int, seg: Sequence[Batch], ref: Reference, normal, claimed: Dict[Batch, bool]) -> bool:
        """One ``generate_iter`` call over the batches of ``seg`` (its first one claimed), writing
        each sample as it comes and claiming each following batch before it is computed. False
        when such a claim fails: the call stops there."""
        g, st = self.groups[gi], self.stores[gi]
        r, n = seg[0].pair
        indices = [i for b in seg for i in b.indices]
        after = {a.indices[-1]: b for a, b in zip(seg, seg[1:])}  # a batch's last sample -> the next batch
        targets = self._target_masks(ref, normal, indices)
        self.status_text = f"{g.key}: {len(indices)} sample(s)"
        self.bars.status(self.status_text)
        gen = self.pipe.generate_iter(ref.image, ref.mask, normal, [t.mask for t in targets], g.prompt, g.word,
                                      **self.settings.keywords())
        replay = None
        try:
            for j, image, mask in gen:
                i = indices[j]
                if replay is None:
                    replay = self._replay(normal)
                record = {"seed": [self.settings.seed, i], "normal": g.normal_names[n],
                          "mask_params": targets[j].params,
                          "quality": sample_quality(image, replay[0], np.asarray(mask) > 127, ref.image, ref.mask,
                                                    baseline_kind=replay[1])}
                if g.record_reference:
                    record["reference"] = g.ref_names[r]
                # what the settings' relative input paths are relative to (outside the settings,
                # so folders written before it still resume): o2mag curate and review read it
                record["cwd"] = os.getcwd()
                try:
                    st.write(i, image, np.asarray(mask) > 127, record)
                    self.made[gi] += 1
                except ClaimLostError as e:
                    print(f"o2mag: warning: {e}", file=sys.stderr)
                self.bars.update()
                nxt = after.get(i)
                if nxt is not None and not claimed[nxt]:  # before the next batch is computed
                    if claim_batch(st, nxt.indices) != list(nxt.indices):
                        return False
                    claimed[nxt] = True
        finally:
            gen.close()
        return True

    def _replay(self, normal) -> Tuple[Any, str]:
        """The baseline of the quality record: the normal branch's replay decoded (one VAE decode
        per pair; the target equals it outside ``M_T`` with the blend on), or the normal image for a
        pipeline that does not expose its last run."""
        last = getattr(self.pipe, "last_run", None)
        if isinstance(last, dict) and last.get("normal_latent") is not None:
            return self.pipe.decode_latents(last["normal_latent"])[0], "replay"
        return normal, "normal"


def run_groups(pipe, out: str | os.PathLike, groups: List[Group], opts: RunOptions, state: ProcessState, *,
               progress: bool = True, per_category: bool = False,
               announce: Optional[Callable[[List[GroupResult], List[OutputStore]], None]] = None) -> RunReport:
    """``Runner(...).run()``: make every missing sample of ``groups`` under ``out`` (see :class:`Runner`)."""
    return Runner(pipe, out, groups, opts, state, progress=progress, per_category=per_category,
                  announce=announce).run()
