"""How many torch threads to use on a CPU that other work may share, set in one place.

On a shared CPU, torch threads that outnumber the idle cores spin against each other
(measured: grounding steps 10x slower with 2 threads beside one busy process;
imagination 3x slower). Stages that run a model on the CPU ask :func:`free_cores`
when they start.
"""

from __future__ import annotations

import os
import time


def free_cores(window_s: float = 0.5) -> int:
    """Cores not busy with other work right now (at least one).

    The idle share is sampled from ``/proc/stat`` over a short window rather than read
    from the 1-minute load average, which still counts this process's own previous
    stage (in ``kalm run`` the collection that just ended made grounding take one core).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = _busy_cores(window_s)
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - round(busy)))


def _busy_cores(window_s: float) -> float | None:
    """Cores' worth of CPU time used by everything during ``window_s`` (Linux only)."""

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                values = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    first = sample()
    if first is None:
        return None
    time.sleep(window_s)
    second = sample()
    if second is None:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    cores = os.cpu_count() or 1
    return (1.0 - idle / total) * cores


def launched_share() -> int | None:
    """Under a launcher that started several processes on this machine (torchrun and
    ``accelerate launch`` set ``LOCAL_WORLD_SIZE``), each process's equal share of the
    cores; None otherwise. Sampling idle cores there would race the sibling processes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)


def set_torch_threads(count: int | None = None) -> int:
    """Set torch's CPU threads for the work about to start; returns the count set.

    ``count`` when given, else ``OMP_NUM_THREADS`` when the user set it, else this
    process's share of the cores under a multi-process launch (:func:`launched_share`),
    else the idle cores (:func:`free_cores`). Every
    stage that runs torch on the CPU comes through here, so the choice is made in one
    place. Without an explicit count a CUDA machine is left alone: its CPU threads only
    feed the GPU.
    """
    import torch

    if count is None and torch.cuda.is_available():
        return torch.get_num_threads()
    if count is not None and count < 1:
        raise ValueError(f"torch threads must be at least 1, got {count}")
    chosen = count or _omp_threads() or launched_share() or free_cores()
    torch.set_num_threads(chosen)
    return chosen


def _omp_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None
