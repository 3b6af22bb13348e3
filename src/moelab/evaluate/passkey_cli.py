"""``moelab eval passkey``: retrieval accuracy over context lengths × depths, with a heatmap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from moelab.cli_utils import check_out_dir, err, friendly, resolve_device
from moelab.common.progress import Bars
from moelab.errors import MoelabError


def _numbers(text: str, kind, what: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoelabError(f"{what} must be comma-separated numbers (got {text!r})") from None


@friendly
def passkey(
    model: Annotated[str, typer.Argument(help="'smollm2' or a checkpoint directory.", show_default=False)],
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "256,512,1024",
    depths: Annotated[str, typer.Option(help="Depths of the key in [0, 1], comma-separated.")] = "0,0.25,0.5,0.75,1",
    trials: Annotated[int, typer.Option(min=1, help="Keys per cell.")] = 5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the keys.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory for passkey.json and "
                                                                 "passkey.png.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ... (auto: cuda when available).")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Passkey retrieval: a 5-digit key hidden at each depth of filler text of each length; accuracy of
    the model saying it back (greedy), as a table and a heatmap. Lengths beyond the context are skipped.

        moelab eval passkey runs/code-long/model --lengths 512,1024,2048,4096 --out runs/passkey
    """
    from moelab.evaluate.load_cli import load_model
    from moelab.evaluate.passkey import heatmap, run_passkey

    ns, ds = _numbers(lengths, int, "--lengths"), _numbers(depths, float, "--depths")
    if not ns or not ds:
        raise MoelabError("give at least one length and one depth")
    if any(not 0 <= d <= 1 for d in ds):
        raise MoelabError(f"--depths must lie in [0, 1] (got {depths})")
    if out is not None:
        check_out_dir(out)
    m, tok = load_model(model, resolve_device(device))
    with Bars(enabled=not quiet) as bars:
        task = bars.add_task("passkey", total=len(ns) * len(ds))
        result = run_passkey(m, tok, ns, ds, trials, seed, on_cell=lambda k: bars.advance(task, k))
    result["model"] = model
    width = max(len(str(n)) for n in result["lengths"])
    print(f"{'length':>{max(width, 6)}} " + " ".join(f"{d:>6g}" for d in result["depths"]))
    for n, row in zip(result["lengths"], result["accuracy"], strict=True):
        print(f"{n:>{max(width, 6)}} " + " ".join(f"{v:>6.0%}" for v in row))
    print(f"mean accuracy {result['mean_accuracy']:.3f}")
    if result["skipped_lengths"]:
        err.print(f"skipped lengths beyond the context of {result['context']} tokens: {result['skipped_lengths']}")
    if out is not None:
        from moelab.common.atomic import write_text

        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "passkey.json", json.dumps(result, indent=2) + "\n")
        heatmap(result, out / "passkey.png", title=f"passkey retrieval — {Path(model).name}")
        err.print(f"wrote {escape(str(out / 'passkey.json'))} and passkey.png", highlight=False)


__all__ = ["passkey"]
