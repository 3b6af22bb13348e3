"""The ``moelab`` command line.

    moelab info configs/tiny.toml            # parameters, activated parameters, cache, FLOPs
    moelab info path/to/checkpoint --json
    moelab init configs/tiny.toml --out runs/tiny-init
    moelab generate runs/tiny-init --prompt "To be" --max-new-tokens 32 --greedy

Errors a user can cause are printed as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moelab.analysis.analyze_cli import analyze_app
from moelab.cli_utils import err, friendly, read_model_source, resolve_device
from moelab.common.atomic import CHECKPOINT, check_output_dir
from moelab.data.cli import data_app
from moelab.dist.export_cli import export
from moelab.dist.plan_cli import plan
from moelab.errors import MoelabError
from moelab.evaluate.cli import eval_app
from moelab.scaling.cli import scaling_app
from moelab.serve.cli import serve
from moelab.tune.cli import finetune_app
from moelab.tune.esft_cli import esft_app
from moelab.vision.cli import vl_app

app = typer.Typer(
    name="moelab", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="A toolkit for DeepSeek-style sparse language models (DeepSeekMoE, MLA, YaRN).",
    # Help text is plain text: rich markup would swallow "[model]", "[train]", "moelab[hf]" (every
    # sub-command inherits this mode). Plain help wraps at most at 100 columns.
    rich_markup_mode=None, context_settings={"max_content_width": 100},
)
app.add_typer(data_app, name="data", help="Prepare corpora: train a tokenizer, write memory-mapped token files.")
app.add_typer(finetune_app, name="finetune",
              help="Fine-tune a checkpoint on chat / prompt-completion data: full, lora, plora, esft; merge results.")
app.add_typer(esft_app, name="esft", help="Expert-Specialized Fine-Tuning: score, select, train, merge experts.")
app.add_typer(analyze_app, name="analyze",
              help="Look inside a model: routing statistics, parameter activation and pruning, number probes.")
app.add_typer(eval_app, name="eval",
              help="Measure a model: perplexity / bits per byte, task harness, UMP/CCC, HumanEval, infilling, passkey.")
app.add_typer(scaling_app, name="scaling",
              help="DeepSeek LLM scaling laws: FLOPs per token, LR/batch/model/data for a budget, IsoFLOP sweeps.")
app.add_typer(vl_app, name="vl", help="DeepSeek-VL2: dynamic tiling and the image tokens of an image size.")


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _vl_rows(vcfg, vb) -> list[tuple[str, str, str]]:
    """The vision-language rows of `moelab info` (moelab.model.vl_accounting)."""
    v = vcfg.vision
    return [
        ("vision encoder", _human(vb.vision_params),
         f"{vb.vision_params:,}: SigLIP {v.num_hidden_layers}×{v.hidden_size}, {v.image_size}px tiles of "
         f"{v.patch_size}px patches (released files add a {_human(vb.pooling_head_params)} pooling head, never run)"),
        ("adaptor", _human(vb.adaptor_params),
         f"{vb.adaptor_params:,}: {vcfg.downsample}×{vcfg.downsample} downsample MLP + image_newline, view_separator"),
        ("VLM total parameters", _human(vb.total_params),
         f"{vb.total_params:,} (as released, with the pooling head: {_human(vb.released_total_params)})"),
        ("VLM activated parameters", _human(vb.activated_params),
         f"{vb.activated_params:,} ({_human(vb.activated_params_papers)} without the input-embedding lookup, "
         "the papers' convention)"),
    ]


@app.command()
@friendly
def info(
    path: Annotated[Path, typer.Argument(help="A TOML config (with a [model] section) or a checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as one JSON object.")] = False,
    seq_len: Annotated[int | None, typer.Option(min=1, help="Context length l_seq for the FLOPs formula "
                                                      "(default: the pre-YaRN context, "
                                                      "else max_position_embeddings).")] = None,
):
    """Count total and activated parameters, KV-cache bytes per token and FLOPs per token.

    Nothing is allocated: the model is built on PyTorch's meta device, so even DeepSeek-V3 (671B)
    is counted in a second. A vision-language config or checkpoint (DeepSeek-VL2: [vision] in the TOML,
    model_type deepseek_vl_v2) adds the encoder, the adaptor and the whole model's counts.
    """
    from moelab.interop.vl_hf_config import vl_config_of
    from moelab.model.accounting import model_budget

    vcfg = vl_config_of(path)
    vb = None
    if vcfg is not None:
        from moelab.model.vl_accounting import vl_budget

        cfg, vb = vcfg.language, vl_budget(vcfg, seq_len=seq_len)
        b = vb.language
    else:
        cfg = read_model_source(path)
        b = model_budget(cfg, seq_len=seq_len)
    if as_json:
        print(json.dumps({"config": str(path), **b.as_dict(), **({"vl": vb.as_dict()} if vb else {})}, indent=2))
        return
    t = Table(title=f"moelab info — {escape(str(path))}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    ratio = b.mha_cache_elems_per_token / b.cache_elems_per_token
    kind = ("MLA latent + RoPE key" if cfg.use_mla
            else f"{'MHA' if cfg.kv_heads == cfg.num_attention_heads else 'GQA'} K/V")
    lm = "language model: " if vb else ""
    rows = [
        (f"{lm}total parameters", _human(b.total_params), f"{b.total_params:,}"),
        (f"{lm}activated parameters", _human(b.activated_params), f"{b.activated_params:,}"),
        ("layers", f"{b.moe_layers} MoE + {b.dense_layers} dense",
         f"{cfg.n_routed_experts or 0} routed (top-{cfg.num_experts_per_tok or 0}) + {cfg.n_shared_experts or 0} shared"
         if cfg.is_moe else "dense model"),
        ("KV cache / token", f"{b.cache_bytes_per_token:,} B",
         f"{b.cache_elems_per_token:,} values: {kind}, {b.cache_dtype}"),
        ("MHA-equivalent cache", f"{b.mha_cache_bytes_per_token:,} B", f"{ratio:.1f}x larger"),
        ("FLOPs/token 72Ld²+12Ld·l", _human(b.flops_per_token), f"non-embedding, l_seq={b.seq_len}"),
        ("FLOPs/token 6N_act+12Ld·l", _human(b.flops_per_token_active), "MoE-aware, activated params"),
    ]
    if vb is not None:
        rows[2:2] = _vl_rows(vcfg, vb)
    for r in rows:
        t.add_row(*(escape(c) for c in r))
    Console().print(t)


@app.command()
@friendly
def init(
    config: Annotated[Path, typer.Argument(help="TOML config with a [model] section.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it holds a moelab checkpoint.")] = False,
):
    """Write a freshly initialised model as a Hugging Face checkpoint (with a byte-level tokenizer).

    The tokenizer is an untrained byte-level BPE (256 byte tokens + DeepSeek special tokens), so any
    text can be fed to the model; `moelab data` (pre-training) trains a real one. --out must be a new or
    empty directory, or (with --overwrite) a checkpoint moelab wrote; nothing else is ever replaced.
    """
    import torch

    from moelab.config import load_model_config
    from moelab.data.tokenizer import SPECIAL_TOKENS, byte_level_tokenizer, save_tokenizer
    from moelab.interop.checkpoint import save
    from moelab.interop.hf_config import hf_compatibility_warnings
    from moelab.model.transformer import DeepSeekForCausalLM

    cfg = load_model_config(config)
    check_output_dir(out, CHECKPOINT, overwrite)
    needed = len(SPECIAL_TOKENS) + 256
    if cfg.vocab_size < needed:
        raise MoelabError(f"vocab_size {cfg.vocab_size} is too small for the byte-level tokenizer "
                          f"({needed} tokens); raise vocab_size in {config}")
    if dtype not in ("float32", "bfloat16"):
        raise MoelabError(f"--dtype must be float32 or bfloat16 (got {dtype})")
    model = DeepSeekForCausalLM.from_config(cfg, seed=seed, dtype=getattr(torch, dtype))
    with tempfile.TemporaryDirectory() as tok_dir:   # the tokenizer goes into the atomic write too
        save_tokenizer(byte_level_tokenizer(), tok_dir)
        path = save(model, out, tokenizer=tok_dir, overwrite=overwrite)
    for w in hf_compatibility_warnings(cfg):
        err.print(f"[yellow]note:[/] {escape(w)}")
    n = sum(p.numel() for p in model.parameters())
    Console().print(f"wrote {path} ({n:,} parameters, {dtype})")


class _Streamer:
    """Prints decoded text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, token):
        self.ids.append(int(token[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)


@app.command()
@friendly
def generate(
    checkpoint: Annotated[Path, typer.Argument(
        help="Checkpoint directory (config.json + safetensors [+ tokenizer.json]).")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text to continue.")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Comma-separated token ids instead of --prompt.")] = None,
    fim_prefix: Annotated[str | None, typer.Option(
        help="Fill in the middle: the code before the hole (with --fim-suffix; instead of --prompt). Sends "
             "<｜fim▁begin｜>PREFIX<｜fim▁hole｜>SUFFIX<｜fim▁end｜> and prints the middle the model writes.")] = None,
    fim_suffix: Annotated[str | None, typer.Option(help="Fill in the middle: the code after the hole.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=0, help="Tokens to generate.")] = 64,
    greedy: Annotated[bool, typer.Option(
        "--greedy", help="Always take the most likely token (deterministic).")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="Softmax temperature; 0 = greedy.")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k most likely tokens; 0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1]; 1 = off.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = True,
    bos: Annotated[bool, typer.Option(help="Prepend the BOS token to a text prompt.")] = True,
    dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16 (default: as stored).")] = None,
    as_ids: Annotated[bool, typer.Option("--ids", help="Also print the generated token ids.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (auto: cuda when available).")] = "auto",
    decode: Annotated[str, typer.Option(
        help="How decode steps run: auto (graph on CUDA, else dynamic), dynamic (growable cache), static "
             "(preallocated cache), graph (static, each step one CUDA graph), compile (static, torch.compile'd "
             "layers, a CUDA graph on CUDA; compiles for tens of seconds first).")] = "auto",
):
    """Continue a prompt with a checkpoint, streaming the text to the terminal.

    Uses the MLA latent cache (absorbed attention). Examples:

        moelab generate runs/tiny-init --prompt "To be, or not to be" -n 32 --greedy

        moelab generate CKPT -p "Once upon" --temperature 0.8 --top-p 0.95 --seed 1

        moelab generate CKPT --fim-prefix "def area(r):\n    return " --fim-suffix "\n" --greedy
    """
    import torch

    from moelab.data.tokenizer import load_tokenizer
    from moelab.infer import DECODE_MODES, SamplingConfig
    from moelab.infer import generate as run_generate
    from moelab.interop.checkpoint import load

    fim = fim_prefix is not None or fim_suffix is not None
    if (prompt is not None) + (prompt_ids is not None) + fim != 1:
        raise MoelabError("give exactly one of --prompt TEXT, --prompt-ids 1,2,3 or --fim-prefix/--fim-suffix")
    if dtype not in (None, "float32", "bfloat16"):
        raise MoelabError(f"--dtype must be float32 or bfloat16 (got {dtype})")
    dev = resolve_device(device)
    if decode not in DECODE_MODES:
        raise MoelabError(f"--decode must be one of {', '.join(DECODE_MODES)} (got {decode})")
    if decode == "graph" and not dev.startswith("cuda"):
        raise MoelabError(f"--decode graph captures CUDA graphs; --device is {dev} (use static or compile)")
    sampling = SamplingConfig(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    model = load(checkpoint, dtype=dtype, device=dev, progress=True)
    cfg = model.config
    tokenizer = None
    if prompt is not None or fim:
        from moelab.data.fim import fim_prompt_ids

        tokenizer = load_tokenizer(checkpoint)
        ids = (fim_prompt_ids(tokenizer, fim_prefix or "", fim_suffix or "") if fim
               else tokenizer.encode(prompt, add_special_tokens=False).ids)
        if bos and cfg.bos_token_id is not None:
            ids = [cfg.bos_token_id, *ids]
    else:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise MoelabError(f"--prompt-ids must be comma-separated integers (got {prompt_ids!r})") from None
        if (checkpoint / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(checkpoint)
    if not ids:
        raise MoelabError("the prompt is empty after tokenisation")
    context = cfg.max_position_embeddings
    if len(ids) + max_new_tokens > context:
        room = f"lower -n to at most {context - len(ids):,}, " if len(ids) < context else "shorten the prompt, "
        raise MoelabError(f"the prompt ({len(ids):,} tokens) plus -n {max_new_tokens:,} new tokens exceeds the "
                          f"model's context of {context:,} tokens (max_position_embeddings); {room}or extend the "
                          "context first with `moelab extend-context`")
    input_ids = torch.tensor([ids], device=dev)
    streamer = _Streamer(tokenizer) if (stream and tokenizer is not None) else None
    if streamer is not None and prompt is not None:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    out = run_generate(model, input_ids, max_new_tokens, sampling, eos_token_id=cfg.eos_token_id,
                       on_token=streamer, decode=decode)
    new = out[0, len(ids):].tolist()
    if streamer is not None:
        rest = tokenizer.decode(streamer.ids, skip_special_tokens=True)[streamer.printed:]
        sys.stdout.write(rest + "\n")
    elif tokenizer is not None:
        print((prompt or "") + tokenizer.decode(new, skip_special_tokens=True))
    if as_ids or tokenizer is None:
        print(",".join(str(i) for i in new))


@app.command("extend-context")
@friendly
def extend_context_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory to extend.")],
    factor: Annotated[float, typer.Option(help="YaRN scale s: the new context is s times the original "
                                               "(DeepSeek-V2/V3 and Coder-V2: 40, 4K -> 128K).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the extended checkpoint.")],
    beta_fast: Annotated[float, typer.Option(help="YaRN beta (fast boundary, rotations).")] = 32.0,
    beta_slow: Annotated[float, typer.Option(help="YaRN alpha (slow boundary, rotations).")] = 1.0,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it holds a moelab checkpoint.")] = False,
):
    """Extend a checkpoint's context with YaRN: the same weights, new RoPE frequencies.

    Sets rope_scaling (factor, original length = the current max_position_embeddings, beta_fast 32, beta_slow 1,
    mscale = mscale_all_dim = 0.707 as DeepSeek's configs) and max_position_embeddings = original x factor.
    transformers opens the result. Then train briefly at the longer length (train.init_from = --out) and
    check with `moelab eval passkey`.

        moelab extend-context runs/code/model --factor 4 --out runs/code-long/model
    """
    from moelab.interop.extend_context import extend_context

    done = extend_context(checkpoint, factor, out, overwrite=overwrite, beta_fast=beta_fast, beta_slow=beta_slow)
    Console().print(f"wrote {done}")


@app.command()
@friendly
def train(
    config: Annotated[Path, typer.Argument(help="TOML file with [model], [data], [train] and [balance] sections.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run directory (default: runs/<config name>).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a setting: --set train.steps=200 --set balance.method=aux_loss (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    allow_config_change: Annotated[bool, typer.Option(
        "--allow-config-change", help="With --resume: apply settings that differ from the run's record (refused "
        "by default; recorded in RUN_DIR/config_changes.jsonl).")] = False,
):
    """Pre-train a model: AdamW, LR schedule, bf16 autocast, loss-free balancing, checkpoints, report.

    Prepare data first (moelab data prepare shakespeare --out runs/data/shakespeare). Writes
    RUN_DIR/metrics.jsonl, TensorBoard events (RUN_DIR/tb), checkpoints (RUN_DIR/checkpoints/step-N, each
    a Hugging Face model plus the training state; sharded under torchrun) and RUN_DIR/report/ (loss,
    MaxVio and expert-load plots, summary.md). Ctrl-C writes a checkpoint and stops; --resume continues
    exactly (changed settings are shown and refused unless --allow-config-change). --out must be new or
    empty, or hold a run; one process at a time may train in it.

        moelab train configs/tiny.toml --set train.steps=300

        moelab train configs/tiny.toml --out runs/tiny --resume

    On several processes or GPUs, launch with torchrun; [parallel] sets the mesh (dp × ep = processes):

        torchrun --nproc_per_node=4 -m moelab train configs/tiny.toml --set parallel.ep=2
    """
    from moelab.train.config import load_run_config
    from moelab.train.loop import train as run_train

    cfg = load_run_config(config, overrides or [])
    run_dir = out or Path("runs") / config.stem
    result = run_train(cfg, run_dir, resume=resume, progress=progress, allow_config_change=allow_config_change)
    if os.environ.get("RANK", "0") != "0":      # under torchrun rank 0 reports for the job
        raise typer.Exit(130 if result.status == "interrupted" else 0)
    ev = result.last_eval
    line = f"step {result.step}, {result.tokens:,} tokens"
    if ev:
        line += (f" · val loss {ev['val_loss']:.3f} · ppl {ev['val_ppl']:.2f} · {ev['val_bpb']:.3f} bits/byte"
                 + (f" · MaxVio_global {ev['maxvio_global']:.3f}" if "maxvio_global" in ev else ""))
    if result.status == "interrupted":
        err.print(f"interrupted: checkpoint {result.checkpoint}; continue with --resume")
        raise typer.Exit(130)
    Console().print(f"{line}\nreport: {result.run_dir / 'report' / 'summary.md'}\n"
                    f"checkpoint: {_final_model(result)}")


def _final_model(result) -> str:
    """Where the trained model opens: the checkpoint's model/, or RUN_DIR/model for a sharded run."""
    if result.checkpoint is None:
        return "-"
    from moelab.dist.checkpoint import is_sharded

    return str(result.run_dir / "model" if is_sharded(result.checkpoint) else result.checkpoint / "model")


@app.command()
@friendly
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory written by `moelab train`.")]):
    """(Re)write RUN_DIR/report/ from metrics.jsonl and expert_load.npy."""
    from moelab.train.report import write_report

    Console().print(f"wrote {write_report(run_dir)}")


app.command()(plan)
app.command()(export)
app.command()(serve)
