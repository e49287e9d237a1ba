"""Timing and memory measurement shared by the benchmark suites.

Times are medians of repeated runs after a warm-up, with CUDA synchronisation on a GPU. On a GPU
two more numbers: the wall time per call in a stream of back-to-back calls (host overhead shows
when it exceeds the kernel time, as in a UNet's small layers), and the device (kernel) time per
call from ``torch.profiler``. Peak memory
is what the call added on top of what was live before it: ``torch.cuda.max_memory_allocated`` on a
GPU, the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) on a CPU.
"""
from __future__ import annotations

import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """Human name of the device the numbers were taken on (results files are named after it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


ROOT = Path(__file__).resolve().parent.parent


def environment(device: torch.device) -> dict:
    """What a results file records about where its numbers were taken: the device, torch, triton
    and Python versions, torch's thread count and the checkout's commit (:func:`commit`)."""
    try:
        import triton  # deferred: optional (no triton on a CPU-only machine)

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version, "python": sys.version.split()[0],
            "torch_threads": torch.get_num_threads(), "commit": commit()}


def commit():
    """The checkout's short commit id (with '+' when it has uncommitted changes), or None."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10)
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        # result files this run (or an earlier one) wrote do not make the code dirty
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", ".",
                    ":(exclude)benchmarks/results").stdout.strip()
        return head.stdout.strip() + ("+" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, *, repeats: int = 5, warmup: int = 1, max_seconds: float = 30.0):
    """Median wall time of ``fn()``; stops early (at least 3 runs) once ``max_seconds`` is spent."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def stream_seconds(fn, device, *, calls: int = 20, repeats: int = 5) -> float:
    """Median over ``repeats`` of (wall time of ``calls`` back-to-back calls) / ``calls``."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def kernel_seconds(fn, device, *, calls: int = 10):
    """Device time per call: every CUDA kernel's time summed over ``calls`` calls (torch.profiler),
    divided by ``calls``; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us * 1e-6 / calls


def _rss_peak_kib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    raise OSError("VmHWM not found")


def peak_memory_mib(fn, device):
    """Extra memory one call of ``fn`` needs at its peak (MiB), or None where it can't be read."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak RSS to the current RSS
        base = _rss_peak_kib()
        out = fn()
        del out
        return (_rss_peak_kib() - base) / 1024
    except OSError:
        return None
