"""Scale-out on this machine: tokens/s and communication per step with 1, 2 and 4 processes (gloo on the
CPU), measured against what ``moelab plan`` predicts for the same mesh.

    python benchmarks/scaling.py                         # configs/tiny.toml, batch 8 × 256 tokens, 5 steps
    python benchmarks/scaling.py --meshes 1x1 2x1 1x2 2x2 --steps 10 --json runs/bench-scaling.json
    python benchmarks/scaling.py --device cuda            # NCCL: the meshes that fit the GPUs present

Every mesh ``DPxEP`` trains the same global batch (each rank takes batch/world rows) for ``--steps`` steps
after a warm-up step, and reports per step: tokens/s (global), the speed-up over one process, the bytes
one rank sends by collective (all-gather, reduce-scatter, all-to-all; :mod:`moelab.dist.traffic`) next
to the planner's figure and their ratio, and the share of the step spent inside the all-to-alls and
inside any collective.

Be honest about the hardware: this machine has 2 CPU cores, so 2 processes at one thread each already
use every core and 4 processes share them — the speed-up measures the cost of the communication more than
any gain. The bytes do not depend on the hardware: they are what the planner is checked against.
With ``--device cuda`` each process takes one GPU and NCCL (a one-process run still opens a one-rank NCCL
group and runs a collective: a smoke test of the backend).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.config import load_model_config
from moelab.dist.mesh import ParallelConfig
from moelab.dist.plan import plan
from moelab.dist.plan_mesh import Mesh
from moelab.train.measure_parallel import measure_steps

MB = 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: dict, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args["threads"])
    try:
        cuda = args["device"] == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=300),
                                device_id=torch.device("cuda", rank) if cuda else None)
        if world == 1 and cuda:                               # the NCCL smoke test of a one-process run
            t = torch.ones(1, device="cuda")
            dist.all_reduce(t)
            assert float(t) == 1.0
        cfg = load_model_config(args["config"])
        out = measure_steps(cfg, ParallelConfig(dp=args["dp"], ep=args["ep"]), args["batch"], args["seq_len"],
                            args["steps"], dtype=args["dtype"], device=args["device"])
        queue.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - reported by the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_mesh(dp: int, ep: int, args: dict) -> list[dict]:
    world = dp * ep
    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, {**args, "dp": dp, "ep": ep}, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in range(world):
        rank, ok, value = queue.get()
        (results.__setitem__(rank, pickle.loads(value)) if ok else errors.append(f"rank {rank}:\n{value}"))
    for p in procs:
        p.join(60)
    if errors:
        raise SystemExit(f"mesh dp={dp} × ep={ep} failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.toml", help="model config (TOML with [model])")
    ap.add_argument("--meshes", nargs="+", default=["1x1", "2x1", "1x2", "4x1", "2x2", "1x4"],
                    help="DPxEP meshes to run (default: 1, 2 and 4 processes)")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences); divisible by every world size")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per mesh (after one warm-up)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    cfg = load_model_config(a.config)
    meshes = [tuple(int(x) for x in m.lower().split("x")) for m in a.meshes]
    if a.device == "cuda":
        gpus = torch.cuda.device_count()
        meshes = [m for m in meshes if m[0] * m[1] <= gpus]
        if not meshes:
            raise SystemExit("no CUDA device: run without --device cuda")
    args = {"config": a.config, "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps, "dtype": a.dtype,
            "device": a.device, "threads": a.threads}
    cpu = _cpu_name()
    print(f"{a.config}: batch {a.batch} × {a.seq_len} tokens, {a.steps} steps, {a.dtype}, {a.device} "
          f"({cpu}; {os.cpu_count()} cores, {a.threads} thread(s) per process)")
    header = (f"{'mesh':>9} {'procs':>5} {'tokens/s':>9} {'vs 1':>5} {'step ms':>8} {'all-gather MB':>18} "
              f"{'reduce-scatter MB':>18} {'all-to-all MB':>18} {'a2a %':>6} {'comm %':>6}")
    print(header)
    rows, base = [], None
    for dp, ep in meshes:
        got = run_mesh(dp, ep, args)
        p = plan(cfg, Mesh(dp=dp, ep=ep), seq_len=a.seq_len, micro_batch=a.batch // (dp * ep),
                 precision="fp32" if a.dtype == "float32" else "bf16")
        r0 = got[0]
        tps = min(r["tokens_per_s"] for r in got)                    # the slowest rank sets the pace
        base = base or tps
        sent = {k: max(r["sent"].get(k, 0.0) for r in got) for k in ("all_gather", "reduce_scatter", "all_to_all")}
        planned = {"all_gather": p.comm.fsdp_all_gather, "reduce_scatter": p.comm.fsdp_reduce_scatter,
                   "all_to_all": p.comm.all_to_all}
        a2a_share = max(r["comm_s"].get("all_to_all", 0.0) / r["step_s"] for r in got)
        comm_share = max(sum(r["comm_s"].values()) / r["step_s"] for r in got)
        row = {"dp": dp, "ep": ep, "processes": dp * ep, "tokens_per_s": tps, "speedup": tps / base,
               "step_ms": 1e3 * max(r["step_s"] for r in got), "sent": sent, "planned": planned,
               "all_to_all_share": a2a_share, "comm_share": comm_share, "state_bytes": r0["state_bytes"],
               "planned_state_bytes": {"parameters": p.weights_bytes, "gradients": p.grads_bytes,
                                       "optimizer": p.optimizer_bytes}, "cpu": cpu, "device": a.device}
        rows.append(row)
        cells = " ".join(_vs(sent[k], planned[k]) for k in ("all_gather", "reduce_scatter", "all_to_all"))
        print(f"{f'{dp}x{ep}':>9} {dp * ep:>5} {tps:>9,.0f} {tps / base:>5.2f} {row['step_ms']:>8.1f} {cells} "
              f"{100 * a2a_share:>6.1f} {100 * comm_share:>6.1f}", flush=True)
    print("MB: one rank's bytes sent per step, measured / planned (ratio); a2a %, comm %: share of the step "
          "inside all-to-alls / any collective (slowest rank)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(a.json)


def _vs(measured: float, planned: float) -> str:
    if not measured and not planned:
        return f"{'-':>18}"
    ratio = f"{measured / planned:.2f}" if planned else "n/a"
    return f"{measured / MB:>6.3f}/{planned / MB:<6.3f}({ratio})".rjust(18)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
