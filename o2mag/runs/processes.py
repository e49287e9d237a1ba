"""Which process this is when a launcher (``accelerate launch``, ``torchrun``) started several, from
accelerate's process state; a plain command is process 0 of 1 and starts nothing."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List

__all__ = ["ProcessState", "process_state", "end_processes"]

_LAUNCH_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# A process that finished waits for the others at the end: as long as a last chunk takes, or a
# slow model load at the start. torch's 30-minute default is too short for big models on NFS.
_COLLECTIVE_TIMEOUT = timedelta(hours=12)


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


def end_processes() -> None:
    """Leave the launch's process group, if this process joined one. Left to interpreter exit,
    gloo's threads can be torn down mid-flight and the process aborts ("terminate called without
    an active exception", exit -6) after its work is done, which a launcher reports as a failure."""
    dist = sys.modules.get("torch.distributed")  # never imported: nothing was joined
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
