"""Preference pairs as training data for DPO, with the reference model's log-probabilities computed once.

Legend: n pairs, B pairs per micro-batch, T = seq_len.

    data = PreferenceData(pairs, seq_len, pad_id, settings)     # pairs: moelab.data.prefs.read_preferences
    data.set_reference(model)                                    # ref log-probs [n, 2], no gradient, once
    batch = data.batch(B, T, step, micro, seed)                  # {"x": [2B, T], "y": [2B, T], "ref": [2B]}
    loss, metrics = data.loss_fn(logits_2BTV, batch)             # the DPO loss of moelab.tune.dpo_loss

Rows are interleaved — chosen, rejected, chosen, rejected, … — so that the contiguous run of rows a
torchrun rank takes holds whole pairs. Batches are a pure function of (seed, step, micro): each epoch
visits the pairs in its own seeded order, so resume is exact. Evaluation batches are the chosen answers
(their NLL is the logged ``val_loss``); the DPO metrics of the training steps are logged with them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from moelab.data.epochs import epoch_indices
from moelab.data.prefs import PreferencePair
from moelab.errors import DataError
from moelab.tune.dpo_loss import IGNORE, dpo_loss


def _rows(examples, seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(examples), seq_len + 1), pad, dtype=np.int64)
    labels = np.full((len(examples), seq_len + 1), IGNORE, dtype=np.int64)
    for i, ex in enumerate(examples):
        n = min(len(ex.ids), seq_len + 1)
        ids[i, :n], labels[i, :n] = ex.ids[:n], ex.labels[:n]
    return ids, labels


class PreferenceData:
    """The training interface of :class:`~moelab.data.sft.SFTData` for pairs (module docstring)."""

    def __init__(self, pairs: list[PreferencePair], seq_len: int, pad_id: int, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, micro_per_step: int = 1,
                 meta: dict | None = None):
        if not pairs:
            raise DataError("no preference pairs in this split")
        self.seq_len, self.micro_per_step = seq_len, micro_per_step
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.chosen = _rows([p.chosen for p in pairs], seq_len, pad_id)
        self.rejected = _rows([p.rejected for p in pairs], seq_len, pad_id)
        self.ref = np.zeros((len(pairs), 2), dtype=np.float64)
        self.meta = dict(meta or {}, pairs=len(pairs))
        answer_bytes = sum(p.chosen.answer_bytes for p in pairs)
        self.bytes_per_token = answer_bytes / max(self.target_tokens, 1)

    def __len__(self) -> int:
        return len(self.ref)

    @property
    def target_tokens(self) -> int:
        return int((self.chosen[1][:, 1:] != IGNORE).sum())

    def _check(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise DataError(f"preference rows were made for seq_len {self.seq_len}, not {seq_len}")

    def pair_rows(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """``{"x", "y", "ref"}`` of pairs ``idx``, interleaved chosen/rejected."""
        ids = np.stack([self.chosen[0][idx], self.rejected[0][idx]], axis=1).reshape(-1, self.seq_len + 1)
        lab = np.stack([self.chosen[1][idx], self.rejected[1][idx]], axis=1).reshape(-1, self.seq_len + 1)
        return {"x": torch.from_numpy(ids[:, :-1].copy()), "y": torch.from_numpy(lab[:, 1:].copy()),
                "ref": torch.from_numpy(self.ref[idx].reshape(-1).copy())}

    def batch(self, batch_size: int, seq_len: int, step: int, micro: int = 0, seed: int = 0) -> dict:
        self._check(seq_len)
        start = (step * self.micro_per_step + micro) * batch_size
        return self.pair_rows(epoch_indices(len(self), start, batch_size, seed))

    def eval_batches(self, batch_size: int, seq_len: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The chosen answers, in order (their NLL is the validation loss)."""
        self._check(seq_len)
        ids, lab = self.chosen
        for b, s in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            rows = slice(s, min(s + batch_size, len(self)))
            yield torch.from_numpy(ids[rows, :-1].copy()), torch.from_numpy(lab[rows, 1:].copy())

    def n_eval_windows(self, seq_len: int) -> int:
        return len(self)

    @torch.no_grad()
    def set_reference(self, model, batch_size: int = 8, device=None) -> None:
        """Log-probabilities of every pair's answers under ``model`` (the reference), once."""
        was_training = model.training
        model.eval()
        device = device or next(model.parameters()).device
        try:
            for s in range(0, len(self), batch_size):
                idx = np.arange(s, min(s + batch_size, len(self)))
                rows = self.pair_rows(idx)
                logits = model(rows["x"].to(device)).logits
                self.ref[idx] = answer_logps(logits, rows["y"].to(device)).double().cpu().view(-1, 2).numpy()
        finally:
            model.train(was_training)

    def loss_fn(self, logits_RTV: torch.Tensor, rows: dict) -> tuple[torch.Tensor, dict]:
        """The DPO loss of a micro-batch's rows (interleaved pairs) and its metrics."""
        logp = answer_logps(logits_RTV, rows["y"].to(logits_RTV.device))
        ref = rows["ref"].to(logp.device, logp.dtype)
        stats = dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], self.beta, self.loss_type,
                         self.label_smoothing)
        return stats.loss, {"dpo_margin": stats.margin, "dpo_accuracy": stats.accuracy,
                            "chosen_reward": float(stats.chosen_rewards.mean()),
                            "rejected_reward": float(stats.rejected_rewards.mean()),
                            "logratio": float((logp.detach() - ref).mean())}


def answer_logps(logits_RTV: torch.Tensor, y_RT: torch.Tensor) -> torch.Tensor:
    """``[R]``: Σ_t log p(y_t) over positions with y ≠ −100 (targets already shifted), fp32."""
    logp = torch.log_softmax(logits_RTV.float(), dim=-1)
    mask = y_RT != IGNORE
    return (logp.gather(-1, y_RT.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


__all__ = ["PreferenceData", "answer_logps"]
