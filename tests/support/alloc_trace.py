"""The live bytes of torch's CPU allocator through a profiled region: every allocation and free recorded by
torch.profiler (``profile_memory=True``), for the planner's memory tests. On sys.path through pytest's
``pythonpath = ["tests/support"]``."""

from __future__ import annotations


def allocations(prof, mark: str = "forward") -> tuple[list[tuple[int, int]], int | None]:
    """(time, +/- bytes) of every CPU allocation and free, and the end time of the range ``mark``."""
    from torch._C._profiler import _EventType  # the event tree torch.profiler's memory timeline reads

    allocs, forward_end = [], []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.name == mark:
            forward_end.append(node.end_time_ns)
        todo += node.children
    return sorted(allocs), (forward_end[0] if forward_end else None)


def live_bytes(prof, mark: str = "forward") -> tuple[int, int | None]:
    """(peak of the live bytes allocated inside the profiled region, the live bytes when the range ``mark``
    ended; None when there is no such range), both relative to the region's start."""
    allocs, ends = allocations(prof, mark)
    live = peak = 0
    at_mark = None
    for t, size in allocs:
        if at_mark is None and ends is not None and t > ends:
            at_mark = live
        live += size
        peak = max(peak, live)
    return peak, at_mark
