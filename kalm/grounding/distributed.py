"""accelerate plumbing for grounding: one ``Accelerator`` per run, and whole weights
where a step needs them (saving, evaluating) when DeepSpeed ZeRO-3 shards them."""

from __future__ import annotations

from contextlib import nullcontext


def make_accelerator(**kwargs):
    """An ``Accelerator``; in a single process, one left by an earlier run with another
    precision is reset first (accelerate keeps its state process-wide and otherwise
    refuses a second run in the same process, e.g. a library user grounding twice)."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes != 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def full_weights(accelerator, module):
    """A context in which ``module`` holds its whole weights: under DeepSpeed ZeRO-3
    they are sharded across processes and gathered collectively (every process must
    enter); otherwise nothing to do."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return nullcontext()
