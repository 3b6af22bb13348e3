"""``moelab vl train``: one DeepSeek-VL2 training stage (alignment, pre-training or SFT) on the one training
loop (:func:`moelab.train.loop.fit`: steps, evaluation, logging, checkpoints, resume, report).

    cfg = load_vl_run_config("configs/vl-tiny-sft.toml")
    result = train_vl(cfg, "runs/vl-sft")          # RUN_DIR/model: a checkpoint in the released VL2 layout

What each stage trains, its template and its balancing: :mod:`moelab.train.vl_config`. Checkpoints are
written in the layout of the released DeepSeek-VL2 models (:mod:`moelab.interop.vl_checkpoint`), so the next
stage starts from ``vl.init_from = RUN_DIR/model``. The language model's experts are balanced by the
balancer of pre-training (it watches every DeepSeekMoE layer of the model, the decoder's included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moelab.common.atomic import OutputKind
from moelab.config import RUNTIME_FIELDS
from moelab.data.split import split_off
from moelab.data.tokenizer import EOS, byte_level_tokenizer
from moelab.errors import ConfigError
from moelab.interop.vl_checkpoint import VL_CHECKPOINT, load_vl, load_vl_state_into, save_vl
from moelab.model.vl_config import vl_config_from_sections
from moelab.model.vl_model import VisionLanguageModel
from moelab.train.job import Job, RunResult
from moelab.train.loop import fit
from moelab.train.vl_config import VLRunConfig
from moelab.train.vl_data import VLData, VLLoadStats, read_vl_records
from moelab.vision.processor import IMAGE, VLProcessor, add_vl_tokens


@dataclass
class VLJob(Job):
    """A :class:`~moelab.train.job.Job` whose weights are a VL checkpoint."""

    tokenizer: Tokenizer | None = None
    final_kind: OutputKind = VL_CHECKPOINT

    def save_weights(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        save_vl(model, ckpt_dir / "model", tokenizer=self.tokenizer)

    def load_weights(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_vl_state_into(model, ckpt_dir / "model")


def check_same_model(sections: dict, model: VisionLanguageModel, src: Path) -> None:
    """Model sections beside ``vl.init_from`` must describe the checkpoint's model (one config file can then
    serve every stage); runtime settings and the image token id may differ."""
    want = vl_config_from_sections(sections, where="the config")
    have = model.vl_config
    diffs = []
    skip = set(RUNTIME_FIELDS) | {"initializer_range", "model_type"}
    a, b = want.language.model_dump(), have.language.model_dump()
    diffs += [f"model.{k} {a[k]!r} vs {b.get(k)!r}" for k in a if k not in skip and a[k] != b.get(k)]
    for part in ("vision", "projector"):
        x, y = getattr(want, part), getattr(have, part)
        x, y = (dataclasses.asdict(x), dataclasses.asdict(y)) if dataclasses.is_dataclass(x) else (
            x.model_dump(), y.model_dump())
        diffs += [f"{part}.{k} {x[k]!r} vs {y.get(k)!r}" for k in x if x[k] != y.get(k)]
    if want.candidate_resolutions() and sorted(want.candidate_resolutions()) != sorted(have.candidate_resolutions()):
        diffs.append("processor: other tile candidates")
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ConfigError(f"vl.init_from {src} is another model than the config's model sections ({shown}); "
                          "remove the model sections or point vl.init_from at a checkpoint of this model")


def set_stage(model: VisionLanguageModel, stage: str, train_encoder: bool = True) -> dict[str, int]:
    """Freeze what ``stage`` does not train; returns trainable parameter counts per part."""
    model.requires_grad_(True)
    if stage == "align":
        model.language.requires_grad_(False)
        model.vision.requires_grad_(train_encoder)
    parts = {"language": model.language, "vision": model.vision, "projector": model.projector}
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in parts.items()}
    counts["separators"] = sum(p.numel() for p in (model.image_newline, model.view_separator) if p.requires_grad)
    return counts


def build_model(cfg: VLRunConfig) -> tuple[VisionLanguageModel, Tokenizer, dict]:
    """The model, its tokenizer and its processor settings: from ``vl.init_from`` or the model sections."""
    if cfg.vl.init_from is not None:
        src = Path(cfg.vl.init_from)
        model = load_vl(src, dtype=torch.float32)
        if cfg.model_sections:
            check_same_model(cfg.model_sections, model, src)
        tok_file = src / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"vl.init_from {src} has no tokenizer.json; a VL checkpoint written by moelab has one")
        tok = Tokenizer.from_file(str(tok_file))
    else:
        vcfg = vl_config_from_sections(cfg.model_sections, where="the config")
        tok = (Tokenizer.from_file(cfg.data.tokenizer) if cfg.data.tokenizer else byte_level_tokenizer())
        add_vl_tokens(tok)
        n = tok.get_vocab_size(with_added_tokens=True)
        if n > vcfg.language.vocab_size:
            raise ConfigError(f"the tokenizer has {n} tokens (VL tokens included) but model.vocab_size is "
                              f"{vcfg.language.vocab_size}; raise model.vocab_size to at least {n}")
        vcfg = vcfg.with_image_token(tok.token_to_id(IMAGE))
        model = VisionLanguageModel.from_config(vcfg, seed=cfg.train.seed)
    if tok.token_to_id(IMAGE) != model.image_token_id:
        raise ConfigError(f"the tokenizer's {IMAGE} id {tok.token_to_id(IMAGE)} is not the model's image_token_id "
                          f"{model.image_token_id}; use the tokenizer saved with the checkpoint")
    return model, tok, model.processor_settings()


def load_vl_data(cfg: VLRunConfig, processor: VLProcessor, pad_id: int) -> tuple[VLData, VLData, VLLoadStats]:
    """(train, validation) data of a stage config."""
    dc, tc = cfg.data, cfg.train
    stats = VLLoadStats()
    exs = read_vl_records(dc.path, processor, dc.seq_len, dc.skip_malformed, stats)
    if dc.val_path:
        train, val = exs, read_vl_records(dc.val_path, processor, dc.seq_len, dc.skip_malformed, stats)
    else:
        train, val = split_off(exs, dc.val_fraction, tc.seed, 0x564C, dc.path, "record")     # "VL"
    vocab = processor.tok.get_vocab_size(with_added_tokens=True)
    mk = dict(processor=processor, seq_len=dc.seq_len, pad_id=pad_id, packing=dc.packing)
    return (VLData(train, micro_per_step=tc.grad_accum, meta={"vocab_size": vocab}, path=dc.path, **mk),
            VLData(val, meta={"vocab_size": vocab}, path=dc.val_path or dc.path, **mk), stats)


def train_vl(cfg: VLRunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
             on_event=None) -> tuple[RunResult, dict]:
    """Train one stage; returns the loop's result and a summary (trainable parameters, data counts)."""
    model, tok, proc_settings = build_model(cfg)
    trainable = set_stage(model, cfg.vl.stage, cfg.vl.train_encoder)
    processor = VLProcessor(tok, template=cfg.template, **proc_settings)
    pad = tok.token_to_id("<｜▁pad▁｜>")
    pad = pad if pad is not None else tok.token_to_id(EOS)
    train, val, stats = load_vl_data(cfg, processor, pad)
    job = VLJob(model=model, train_data=train, val_data=val, config_json=cfg.model_dump_json(indent=2),
                kind=f"vl {cfg.vl.stage}", tokenizer=tok)
    result = fit(job, cfg.train, cfg.balance, cfg.data.seq_len, run_dir, resume=resume, progress=progress,
                 on_event=on_event)
    summary = {"stage": cfg.vl.stage, "template": cfg.template, "trainable": trainable,
               "train_rows": len(train), "val_rows": len(val), "examples": train.meta["examples"],
               "skipped": stats.skipped}
    return result, summary


__all__ = ["VLJob", "build_model", "check_same_model", "load_vl_data", "set_stage", "train_vl"]
