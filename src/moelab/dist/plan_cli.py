"""``moelab plan``: memory per GPU and communication per step of a training run on hardware this machine
does not have (:mod:`moelab.dist.plan`).

    moelab plan configs/deepseek-v3.toml --gpus 2048 --gpu-memory 80GB --mesh dp=32,ep=64
    moelab plan configs/tiny.toml --gpus 8 --seq-len 1024 --micro-batch 16 --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moelab.cli_utils import friendly, read_model_source
from moelab.errors import ConfigError, MoelabError


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e7 else f"{n / 1e6:,.2f} MB"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:,.1f}{unit}"
    return f"{n:,.0f}"


def _memory_table(p, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for name, kw in (("per GPU", {"style": "bold"}), ("no checkpointing", {"justify": "right"}),
                     ("checkpointing", {"justify": "right"}), ("", {"style": "dim"})):
        t.add_column(name, **kw)
    prec = {"bf16-mixed": "fp32", "bf16": "bf16", "fp32": "fp32"}[p.precision]
    experts = (f", {p.experts_per_rank} routed experts per layer /{p.dp}" if p.experts_per_rank else "")
    dense_n = p.gpus if p.dense_shard == "world" else p.dp
    same = [("parameters", p.weights_bytes, f"{_count(p.params_per_rank)} of {_count(p.params_total)}: "
             f"non-expert /{dense_n}{experts}; {prec}"),
            ("gradients", p.grads_bytes, f"{prec}, sharded like the parameters"),
            ("AdamW m, v", p.optimizer_bytes, f"two {prec} moments per parameter"),
            ("FSDP buffers" if p.gpus > 1 else "bf16 weight casts", p.working_weights_bytes,
             "2 neighbouring units gathered + 1 unit's unsharded grads" if p.gpus > 1
             else "autocast copies kept for the backward" if p.working_weights_bytes else "none in this precision")]
    for name, v, note in same:
        t.add_row(name, _gb(v), _gb(v), note)
    tokens = f"{p.micro_batch} × {p.seq_len:,} tokens"
    t.add_row("activations saved", _gb(p.act_saved_bytes), _gb(p.act_saved_ckpt_bytes),
              f"end of forward, micro-batch {tokens}; {p.attention} attention, {p.expert_kernel} experts")
    t.add_row("activations + grads", _gb(p.act_peak_bytes), _gb(p.act_peak_ckpt_bytes),
              "worst phase of the step (loss, a block's backward, all grads)")
    t.add_row("peak", _gb(p.peak_bytes), _gb(p.peak_ckpt_bytes), "parameters + optimizer + buffers + the above",
              style="bold")
    if p.budget_bytes is not None:
        t.add_row("budget", _gb(p.budget_bytes), _gb(p.budget_bytes),
                  f"{_gb(p.gpu_memory_bytes)} − {p.reserve:.0%} − {p.context_bytes / 2**30:g} GiB context")
        fit = ["yes" if f else "no" for f in (p.fits, p.fits_ckpt)]
        t.add_row("fits", *fit, "")
        t.add_row("largest micro-batch", str(p.max_micro_batch), str(p.max_micro_batch_ckpt),
                  f"sequences of {p.seq_len:,} tokens per GPU")
    return t


def _comm_table(p, hidden: int, top_k: int) -> Table:
    c = p.comm
    t = Table(title=f"communication per optimizer step, bytes each GPU sends ({p.grad_accum} micro-batch"
                    f"{'es' if p.grad_accum > 1 else ''} of {p.micro_batch} × {p.seq_len:,} tokens)",
              title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    g = {"bf16-mixed": "bf16", "bf16": "bf16", "fp32": "fp32"}[p.precision]
    r = {"bf16-mixed": "fp32", "bf16": "bf16", "fp32": "fp32"}[p.precision]
    t.add_row("FSDP all-gather", _gb(c.fsdp_all_gather), f"forward + backward re-gather, {g}")
    t.add_row("FSDP reduce-scatter", _gb(c.fsdp_reduce_scatter), f"gradients, {r}")
    if c.hsdp_all_reduce:
        t.add_row("HSDP all-reduce", _gb(c.hsdp_all_reduce), "non-expert gradients across the ep replicas")
    if p.ep > 1:
        t.add_row("expert all-to-all", _gb(c.all_to_all),
                  f"dispatch + combine, forward + backward, (ep−1)/ep = {p.ep - 1}/{p.ep} leaves the GPU")
        t.add_row("  with checkpointing", _gb(c.all_to_all_ckpt), "+ the recomputed forward's dispatch + combine")
        nodes = -(-p.ep // p.gpus_per_node)
        width = c.cross_node_token_bytes_naive // max(top_k * hidden, 1)
        if nodes > 1:
            t.add_row("  of which cross-node", _gb(c.all_to_all_cross_node),
                      f"one row per expert; the ep group spans {nodes} nodes of {p.gpus_per_node}")
            t.add_row("  sent once per node", _gb(c.cross_node_dedup_expected),
                      f"expected {c.remote_nodes_expected:.2f} remote nodes per token (uniform routing)")
            t.add_row("cross-node per token", f"≤ {c.cross_node_token_bytes_bound:,.0f} B",
                      f"one row per node: ≤ {c.nodes_per_token_bound} nodes (node-limited routing) × {hidden:,} × "
                      f"{width} B, vs one per expert: {top_k} rows = {c.cross_node_token_bytes_naive:,.0f} B")
    return t


@friendly
def plan(
    path: Annotated[Path, typer.Argument(help="A TOML config (with a [model] section) or a checkpoint directory.")],
    gpus: Annotated[int, typer.Option(min=1, help="Number of GPUs (ranks).")],
    gpu_memory: Annotated[str, typer.Option(help="Memory of one GPU: 80GB = 80·10⁹ bytes, 96GiB = 96·2³⁰.")] = "80GB",
    mesh: Annotated[str | None, typer.Option(help="dp=N,ep=M with N·M = --gpus (one may be left out). Default: "
                                                  "ep = the largest divisor of the expert count and of --gpus "
                                                  "that is <= min(--gpus, --gpus-per-node); dp = gpus/ep.")] = None,
    seq_len: Annotated[int | None, typer.Option(min=1, help="Tokens per sequence (default: the pre-YaRN "
                                                            "context, else max_position_embeddings).")] = None,
    micro_batch: Annotated[int, typer.Option(min=1, help="Sequences per GPU per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per optimizer step.")] = 1,
    precision: Annotated[str, typer.Option(help="bf16-mixed (fp32 masters, grads, moments; bf16 compute), "
                                                "bf16 (all bf16) or fp32.")] = "bf16-mixed",
    gpus_per_node: Annotated[int, typer.Option(min=1, help="GPUs per node (for cross-node traffic).")] = 8,
    dense_shard: Annotated[str, typer.Option(help="Shard non-expert weights over all GPUs (world) or over dp "
                                                  "only (dp: replicated across each ep group).")] = "world",
    reserve: Annotated[float, typer.Option(min=0.0, max=0.99, help="Fraction of GPU memory kept free "
                                                                   "(allocator fragmentation).")] = 0.10,
    context_gib: Annotated[float, typer.Option(min=0.0, help="GiB taken by the CUDA context, cuBLAS "
                                                             "workspaces and NCCL buffers.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
):
    """Plan a run that cannot be run here: memory per GPU (parameters, gradients, AdamW state, FSDP buffers,
    activations without and with checkpointing), the largest micro-batch that fits, and the bytes FSDP2
    and expert parallelism move per optimizer step. Arithmetic only: nothing is allocated."""
    from moelab.dist.plan import GiB
    from moelab.dist.plan import plan as make_plan
    from moelab.dist.plan_mesh import check_mesh, default_mesh, parse_memory, parse_mesh
    from moelab.model.accounting import pretraining_context

    if dense_shard not in ("world", "dp"):
        raise ConfigError(f"--dense-shard must be 'world' or 'dp' (got {dense_shard!r})")
    memory = parse_memory(gpu_memory)
    cfg = read_model_source(path)
    layout = (parse_mesh(mesh, gpus, gpus_per_node, dense_shard) if mesh is not None
              else default_mesh(cfg, gpus, gpus_per_node, dense_shard))
    check_mesh(cfg, layout, gpus)
    L = seq_len or pretraining_context(cfg)
    p = make_plan(cfg, layout, L, micro_batch, grad_accum=grad_accum, precision=precision, gpu_memory=memory,
                  reserve=reserve, context_bytes=context_gib * GiB)
    if as_json:
        print(json.dumps({"config": str(path), **p.as_dict()}, indent=2))
        return
    title = (f"moelab plan — {escape(str(path))}: {gpus:,} GPUs ({layout.describe()}, {gpus_per_node} per node), "
             f"{_gb(memory)} each, {p.precision}")
    console = Console()
    console.print(_memory_table(p, title))
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in sorted(p.act_breakdown.items(), key=lambda kv: -kv[1]))
    console.print(f"[dim]activations saved without checkpointing, by part: {escape(parts)}[/]", highlight=False)
    console.print(_comm_table(p, cfg.hidden_size, cfg.num_experts_per_tok or 0))
