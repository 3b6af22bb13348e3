"""ESFT — Expert-Specialized Fine-Tuning (docs/methods.md §5, arXiv 2407.01906).

Score every routed expert on task data, keep the most relevant experts of each MoE layer, train only
those, and ship them as a small file that merges back into the base checkpoint::

    summary = score_experts(model, batches)               # how much each expert is used on the task
    cfg = select_experts(summary, "token", p=0.2)         # {"experts": {"1": [8, 26, 55, 6, 20], ...}, ...}
    info = apply_esft(model, cfg)                         # only the selected experts are trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    ...                                                   # train
    save_esft(model, cfg, "out/esft")                     # expert_cfg.json + model.safetensors (trained experts)
    merge_esft("base/", "out/esft", "out/merged")         # a full Hugging Face checkpoint

Legend: B batch, T sequence length, N = B·T tokens, E routed experts, K experts per token,
H hidden, I expert width, n experts selected in a layer. Layers are named by their decoder-layer
index as a string ("1".."26" for DeepSeek-V2-Lite, whose layer 0 is dense).

Modules, in the order of the recipe: :mod:`.layers` (the MoE layers of a model), :mod:`.scores` (token
and gate scores, their normalisation), :mod:`.selection` (summary files, selection, expert configs),
:mod:`.training` (:func:`apply_esft` / :func:`remove_esft`), :mod:`.files` (save, load, merge).
"""

from moelab.tune.esft.files import (
    EXPERT_CONFIG,
    WEIGHTS,
    esft_state_dict,
    load_esft_into,
    merge_esft,
    save_esft,
)
from moelab.tune.esft.layers import moe_layers
from moelab.tune.esft.scores import SCORE_KINDS, SCORE_NORMS, score_experts
from moelab.tune.esft.selection import (
    read_expert_config,
    read_summary,
    select_experts,
    validate_expert_config,
    validate_summary,
    write_expert_config,
    write_summary,
)
from moelab.tune.esft.training import EsftInfo, SelectedRows, apply_esft, remove_esft

__all__ = ["EXPERT_CONFIG", "SCORE_KINDS", "SCORE_NORMS", "WEIGHTS", "EsftInfo", "SelectedRows", "apply_esft",
           "esft_state_dict", "load_esft_into", "merge_esft", "moe_layers", "read_expert_config",
           "read_summary", "remove_esft", "save_esft", "score_experts", "select_experts",
           "validate_expert_config", "validate_summary", "write_expert_config", "write_summary"]
