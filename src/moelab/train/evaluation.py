"""Validation during training: loss (nats/token), perplexity, bits per byte and MaxVio_global.

    for x, y in data.eval_batches(B, T, max_batches):     # x, y [B, T]; targets == -100 carry no loss
        sum += CE(model(x).logits [B, T, V], y, reduction="sum");  count += #(y != -100)
    val_loss = sum / count

Evaluation forwards never move the loss-free bias (the balancer only counts them, for MaxVio_global).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from moelab.dist.mesh import ParallelState
from moelab.dist.wrap import all_sum
from moelab.errors import TrainingError
from moelab.lm.nll import token_nll
from moelab.train.balance import Balancer
from moelab.train.step import autocast_ctx, model_inputs


@torch.no_grad()
def evaluate(model, data, batch_size: int, seq_len: int, max_batches: int, dtype: str,
             balancer: Balancer | None = None, ps: ParallelState | None = None) -> dict:
    """Validation loss (nats/token), perplexity, bits per byte and MaxVio_global.

    Under torchrun each rank scores its rows of every batch (possibly none of a short last batch: it still
    joins the forward's collectives) and the sums are added over ranks."""
    ps = ps or ParallelState.single(model.device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ctx = balancer.measure() if balancer is not None else nullcontext()
    with ctx:
        for batch in data.eval_batches(batch_size, seq_len, max_batches):
            rows = batch if isinstance(batch, dict) else {}     # data with inputs beyond the ids (images)
            x, y = (batch["x"], batch["y"]) if rows else batch
            x, y = ps.my_rows(x), ps.my_rows(y)
            with autocast_ctx(dtype, ps.device):
                logits = model(x.to(ps.device), **model_inputs(data, rows, ps.device)).logits
            y = y.to(ps.device)
            s, n = token_nll(logits, y)
            total, count = total + s, count + n
        total, count = all_sum([total, count], ps)
        count = int(count)
    model.train(was_training)
    if count == 0:
        raise TrainingError("the validation split is too small for one evaluation window; "
                            "lower data.seq_len or prepare more validation data")
    val_loss = total / count
    out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
           "val_bpb": val_loss / math.log(2) / data.bytes_per_token, "val_tokens": count}
    if balancer is not None:
        out.update(balancer.global_stats())
    return out



def check_eval_data(val_data, batch_size: int, seq_len: int) -> None:
    """A validation split too small for one evaluation would fail at the first evaluation: fail now."""
    n = val_data.n_eval_windows(seq_len) if hasattr(val_data, "n_eval_windows") else len(val_data)
    if n == 0:
        where = getattr(val_data, "path", "the data")
        size = f" has {val_data.n_tokens} tokens, which" if hasattr(val_data, "n_tokens") else ""
        raise TrainingError(f"the validation split of {where}{size} is too small for one evaluation window of "
                            f"data.seq_len + 1 = {seq_len + 1} tokens; prepare the data with more "
                            "documents held out (moelab data prepare --val-docs N / --val-fraction F), or "
                            "lower data.seq_len")


