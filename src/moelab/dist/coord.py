"""Rank 0 decides, every rank follows: the small agreements a torchrun job needs so that one rank's
refusal, interrupt or error ends every rank the same way instead of leaving the others waiting in a
collective until the timeout.

    on_main(ps, fn)       fn() on rank 0; a MoelabError it raises is raised on every rank (same message)
    any_rank(ps, flag)    True on every rank when any rank's flag is set (an interrupt seen by one rank)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelab import errors
from moelab.dist.mesh import ParallelState


def on_main(ps: ParallelState, fn):
    """Run ``fn`` on rank 0 only and return its result there (None elsewhere). A :class:`MoelabError`
    from it is broadcast and raised on every rank, so all of them stop with the same one-line message."""
    result, failure = None, None
    if ps.is_main:
        try:
            result = fn()
        except errors.MoelabError as e:
            if not ps.distributed:
                raise
            failure = (type(e).__name__, str(e))
    if ps.distributed:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        kind = getattr(errors, failure[0], errors.MoelabError)
        raise agreed(kind(failure[1]))
    return result


def agreed(e: errors.MoelabError) -> errors.MoelabError:
    """Mark an error that every rank raises alike: the command line prints it on rank 0 only."""
    e.agreed = True
    return e


def any_rank(ps: ParallelState, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (one all-reduce; the flag itself on one process)."""
    if not ps.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ps.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
