"""Model access for the number probes (:mod:`moelab.analysis.probes`): residual states, steering hooks and
greedy answers, on any LLaMA-family transformers model or moelab DeepSeek model.

    with capture_states(model) as states: model.model(ids)        # states[l]: [B, T, H], l = 0..L
    with steering(model, {15: w}, alpha=2.0): generate_answers(model, tok, ids)
    states = collect_states(model, tokens)                        # {"a", "b", "last"} -> [S, N, H]

Legend: N problems, S = L + 1 residual states, H hidden size, B batch, T tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from moelab.analysis.probes_data import PromptTokens, parse_answer
from moelab.analysis.probes_settings import ProbeError
from moelab.common.progress import Bars
from moelab.errors import ConfigError
from moelab.lm.logits import is_moelab, model_device
from moelab.lm.padding import left_pad

if TYPE_CHECKING:
    from rich.console import Console


# --------------------------------------------------------------------------------------------------
# model access: residual states and steering hooks
# --------------------------------------------------------------------------------------------------
def residual_modules(model: nn.Module) -> list[nn.Module]:
    """``[embed_tokens, layers[0], ..., layers[L-1]]``: the modules whose outputs are states 0..L."""
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(embed, nn.Module) or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ProbeError(f"number probes read hidden states from model.model.embed_tokens and model.model.layers "
                         f"(LLaMA, Mistral, Qwen, DeepSeek and moelab models have them); {type(model).__name__} "
                         "does not")
    return [embed, *layers]


def _tensor_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _with_tensor(out, h: torch.Tensor):
    return (h, *out[1:]) if isinstance(out, tuple) else h


@contextmanager
def capture_states(model: nn.Module):
    """Record every residual state of each forward pass: yields a list that fills with S tensors [B, T, H]."""
    mods = residual_modules(model)
    states: list[torch.Tensor | None] = [None] * len(mods)

    def make(i):
        def hook(_mod, _inp, out):
            states[i] = _tensor_of(out).detach()
        return hook

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(mods)]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@contextmanager
def steering(model: nn.Module, directions: dict[int, torch.Tensor | None], alpha: float):
    """Add ``alpha·u`` to residual state l at the last position of every forward pass while active.

    ``directions`` maps a state index l (0..L) to a vector [H] (u = v/‖v‖) or to None for the null
    direction (u = h/‖h‖, the state itself). Other positions and other states are left alone; later
    states change only through the model's own computation.
    """
    mods = residual_modules(model)
    for layer in directions:
        if not 0 <= layer < len(mods):
            raise ConfigError(f"cannot steer residual state {layer}: this model has states 0..{len(mods) - 1}")

    def make(v):
        unit = None if v is None else (v / v.norm()).detach()

        def hook(_mod, _inp, out):
            h = _tensor_of(out).clone()
            last = h[:, -1]
            u = last / last.norm(dim=-1, keepdim=True) if unit is None else unit.to(h)
            h[:, -1] = last + alpha * u
            return _with_tensor(out, h)
        return hook

    # prepend: the shifted state is the layer's output for every other hook too (e.g. capture_states)
    handles = [mods[layer].register_forward_hook(make(v), prepend=True) for layer, v in directions.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def collect_states(model: nn.Module, tokens: PromptTokens, batch_size: int = 32, progress: bool = False,
                   console: Console | None = None) -> dict[str, np.ndarray]:
    """Residual states at each prompt's three positions: ``{"a", "b", "last"}`` → float32 ``[S, N, H]``.

    Prompts are right-padded, so no attention mask is needed: a causal model's real tokens never see the
    padding after them.
    """
    model.eval()
    n = len(tokens.input_ids)
    pos = {"a": tokens.pos_a, "b": tokens.pos_b, "last": tokens.pos_last}
    out: dict[str, np.ndarray] = {}
    dev = model_device(model)
    with capture_states(model) as states, Bars(progress, console=console) as bar:
        task = bar.add_task("hidden states", total=n)
        for s in range(0, n, batch_size):
            chunk = tokens.input_ids[s:s + batch_size]
            T = max(len(c) for c in chunk)
            ids_BT = torch.zeros(len(chunk), T, dtype=torch.long)
            for i, c in enumerate(chunk):
                ids_BT[i, :len(c)] = torch.tensor(c)
            model.model(ids_BT.to(dev))                      # the LM head is not needed
            rows = torch.arange(len(chunk))
            for key, p in pos.items():
                idx = torch.tensor(p[s:s + len(chunk)])
                picked_SBH = torch.stack([st[rows, idx.to(st.device)].float().cpu() for st in states])
                if key not in out:
                    out[key] = np.empty((picked_SBH.shape[0], n, picked_SBH.shape[2]), dtype=np.float32)
                out[key][:, s:s + len(chunk)] = picked_SBH.numpy()
            bar.advance(task, len(chunk))
    return out


# --------------------------------------------------------------------------------------------------
# greedy answers
# --------------------------------------------------------------------------------------------------
def _first_line_done(tokenizer, prompt_len: int):
    """A transformers stopping criterion: a row is done once its first non-empty generated line has ended."""
    from transformers import StoppingCriteria

    class FirstLine(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)

    return FirstLine()


@torch.inference_mode()
def generate_answers(model: nn.Module, tokenizer, input_ids: list[list[int]], max_new_tokens: int = 30,
                     batch_size: int = 32, progress: bool = False, console: Console | None = None,
                     desc: str = "answers") -> list[tuple[str, int | None]]:
    """Greedy continuations of the prompts and the answer parsed from each: N × ``(text, o or None)``.

    Left-padded batches; a row stops at EOS, at the end of its first non-empty line (transformers models)
    or after ``max_new_tokens``. A number cut off by the token limit gives None.
    """
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    dev = model_device(model)
    results: list[tuple[str, int | None]] = []
    with Bars(progress, console=console) as bar:
        task = bar.add_task(desc, total=len(input_ids))
        for s in range(0, len(input_ids), batch_size):
            ids, mask = left_pad(input_ids[s:s + batch_size], pad)
            ids, mask = ids.to(dev), mask.to(dev)
            T = ids.shape[1]
            if is_moelab(model):
                from moelab.infer.generate import generate

                seq = generate(model, ids, max_new_tokens, eos_token_id=eos, attention_mask=mask)
            else:
                from transformers import GenerationConfig, StoppingCriteriaList

                cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                       eos_token_id=eos)
                seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                     stopping_criteria=StoppingCriteriaList([_first_line_done(tokenizer, T)]))
            for row in seq[:, T:].tolist():
                done = eos is not None and eos in row
                if done:
                    row = row[:row.index(eos)]
                text = tokenizer.decode(row, skip_special_tokens=True)
                results.append((text, parse_answer(text, complete=done)))
            bar.advance(task, ids.shape[0])
    return results


__all__ = ["capture_states", "collect_states", "generate_answers", "residual_modules", "steering"]
