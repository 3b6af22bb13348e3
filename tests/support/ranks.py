"""Run a function on W CPU processes joined by gloo (a stand-in for W GPUs), for the distributed tests.

    results = run_ranks(worker, 2, arg1, arg2)      # worker(rank, world, arg1, arg2) -> picklable, per rank

Each process gets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun would set
them, one thread, and an initialised default process group (gloo, 60 s timeout); its return value comes
back through a queue. A rank that raises fails the whole call with that rank's traceback. ``worker`` must be
importable by name (a module-level function) because the processes are spawned.
On sys.path through pytest's ``pythonpath = ["tests/support"]``.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        # plain pickle bytes: tensors travel by value (torch's queue would share them by a file
        # descriptor that dies with this process)
        queue.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 - sent to the parent, which fails the test with it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 300.0) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each computed in its own process."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    for _ in range(world):
        rank, ok, value = queue.get()
        (results.__setitem__(rank, pickle.loads(value)) if ok else errors.append(f"rank {rank}:\n{value}"))
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]

