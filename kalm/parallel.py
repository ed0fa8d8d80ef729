"""Sharding independent work (episodes, generation batches, policies) across the
processes of an ``accelerate launch``, and merging the results back into one-process
order.

Outside a multi-process launch everything here is a no-op, and nothing initialises
torch.distributed. Work items are dealt round-robin (process ``r`` of ``N`` takes items
``r, r + N, ...``) and every item carries its own seed, so the merged result equals a
one-process run whatever ``N`` is. Results travel between the launch's own processes
through torch.distributed's object collectives (pickled in memory); nothing pickled is
written to or read from disk.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


_alone = ContextVar("kalm_alone", default=False)


@contextmanager
def alone():
    """Work done by one process only (while the others wait or do other work): inside,
    :func:`process_group` answers ``(0, 1)``, so nothing shards or waits for the others."""
    token = _alone.set(True)
    try:
        yield
    finally:
        _alone.reset(token)


def process_group() -> tuple[int, int]:
    """``(this process's index, number of processes)``; ``(0, 1)`` when not launched
    with several (torchrun and accelerate set ``WORLD_SIZE``) or inside :func:`alone`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _alone.get():
        return 0, 1
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    # While the first process builds a stage alone (training every policy of a `kalm
    # run` can take hours on a CPU) the others wait in a barrier: give it time.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
    return state.process_index, state.num_processes


def is_main_process() -> bool:
    return process_group()[0] == 0


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """This process's items: every ``count``-th, from ``index``."""
    return list(items[index::count])


def gather_in_order(mine: list[T], index: int, count: int) -> list[T]:
    """Every process's :func:`shard` results, merged into the order of the items they
    came from (collective: every process must call it)."""
    if count == 1:
        return mine
    from accelerate.utils import gather_object

    parts = gather_object([mine])  # one list per process, in process order
    merged: list = [None] * sum(len(part) for part in parts)
    for rank, part in enumerate(parts):
        merged[rank::count] = part
    return merged


def wait_for_everyone() -> None:
    """A barrier across the launch's processes (nothing to wait for in one process)."""
    if process_group()[1] > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def close_process_group() -> None:
    """Destroy torch.distributed's process group, if this process has one, while the
    interpreter is still whole. Left to interpreter shutdown, gloo's worker threads can
    still hold work objects whose teardown needs the interpreter, and the process aborts
    after its work is done ("terminate called without an active exception", pytorch
    issue 190489), failing the launch. Local to each process, so a process that fails
    alone never waits here for the others."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share_from_first(value: T | None) -> T:
    """The first process's ``value``, in every process (collective)."""
    if process_group()[1] == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
