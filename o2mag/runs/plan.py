"""The work split of a run: the batches a one-process run makes, the group order of each process,
how many batches one claims at once, and claiming a batch whole (see :mod:`o2mag.runs.runner`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Set, Tuple

__all__ = ["Batch", "plan_batches", "rotation", "chunk_size", "segments", "available", "claim_batch"]


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
