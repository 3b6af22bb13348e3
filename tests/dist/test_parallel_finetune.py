"""`moelab finetune` under torchrun equals fine-tuning in one process: full (ep 2), LoRA (dp 2,
DDP) and ESFT (ep 2 and dp 2) on the tiny MoE, gloo processes on the CPU, 6 steps of the same global
batches. Losses agree within 1e-5; the final results (model/, adapter/, esft/) equal the one-process ones;
ESFT's frozen experts stay bit-identical to the base wherever they live. PeriodicLoRA and LoRA on routed
experts under expert parallelism are refused with one message from every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ranks import run_ranks
from safetensors.torch import load_file
from tiny import TINY_MOE

import moelab
from moelab.config import make_config
from moelab.data.tasks import generate, write_jsonl
from moelab.data.tokenizer import save_tokenizer, train_tokenizer
from moelab.errors import ConfigError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.tune.config import FinetuneConfig, load_finetune_config
from moelab.tune.run import finetune

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"
MODEL = TINY_MOE | {"first_k_dense_replace": 1, "num_hidden_layers": 3}
STEPS = 6
#: experts 1 and 6 of layer 1 (one on each of 2 ep ranks), expert 2 of layer 2 (ep rank 0 only)
EXPERTS = {"1": [1, 6], "2": [2]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftdist")
    text = EXCERPT.read_text(encoding="utf-8")
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)] + ["0123456789 +-=."], 300)
    (root / "tok").mkdir()
    save_tokenizer(tok, root / "tok")
    base = root / "base"
    moelab.save(DeepSeekForCausalLM.from_config(make_config(MODEL), seed=0), base, tokenizer=root / "tok")
    data = write_jsonl(generate("arithmetic", 120, seed=0), root / "arith.jsonl")
    (root / "expert_cfg.json").write_text(json.dumps(
        {"experts": EXPERTS, "shared_experts": False, "non_expert_modules": False}))
    return {"root": root, "base": base, "data": data, "esft": root / "expert_cfg.json"}


def cfg_for(s, method: str, **extra) -> FinetuneConfig:
    sets = [f"finetune.base={s['base']}", f"data.path={s['data']}", "data.seq_len=32", "data.val_fraction=0.1",
            f"train.steps={STEPS}", "train.batch_size=4", "train.lr=3e-3", "train.dtype=float32", "train.device=cpu",
            f"train.eval_every={STEPS}", f"train.ckpt_every={STEPS}", "train.log_every=1", "train.eval_batches=2",
            "train.threads=1", "train.weight_decay=0.1", f"esft.expert_config={s['esft']}"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_finetune_config(None, sets, method=method)


def _worker(rank: int, world: int, cfg_json: str, run_dir: str) -> dict:
    cfg = FinetuneConfig.model_validate_json(cfg_json)
    logs, evals = [], []
    finetune(cfg, run_dir, progress=False, on_event=lambda kind, rec: (logs if kind == "log" else evals).append(rec))
    return {"loss": [r["loss"] for r in logs], "val": [r["val_loss"] for r in evals]}


def _run(cfg: FinetuneConfig, run_dir: Path, world: int) -> list[dict]:
    return run_ranks(_worker, world, cfg.model_dump_json(), str(run_dir))


def _same_losses(ref: dict, got: list[dict]) -> None:
    for r in got:
        assert len(r["loss"]) == STEPS
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(ref["loss"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r["val"]), torch.tensor(ref["val"]), atol=1e-5, rtol=0)


def test_full_finetune_ep2_equals_one_process(setup, tmp_path):
    ref = _run(cfg_for(setup, "full"), tmp_path / "one", 1)[0]
    got = _run(cfg_for(setup, "full", **{"parallel.ep": 2}), tmp_path / "many", 2)
    _same_losses(ref, got)
    one, many = moelab.load(tmp_path / "one" / "model"), moelab.load(tmp_path / "many" / "model")
    for (k, a), b in zip(one.state_dict().items(), many.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=k)
    assert (tmp_path / "many" / "model" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "many" / "finetune.json").read_text())["method"] == "full"


def test_lora_dp2_equals_one_process(setup, tmp_path):
    """Data-parallel with DDP (lora's default under torchrun)."""
    ref = _run(cfg_for(setup, "lora"), tmp_path / "one", 1)[0]
    got = _run(cfg_for(setup, "lora"), tmp_path / "many", 2)
    _same_losses(ref, got)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "many" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    assert (tmp_path / "many" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("parallel", [{"parallel.ep": 2}, {"parallel.ep": 1}, {"parallel.ep": 2,
                                                                                "parallel.data_parallel": "ddp"}],
                         ids=["ep2-fsdp", "dp2-fsdp", "ep2-ddp"])
def test_esft_trains_selected_experts_wherever_they_live(setup, tmp_path, parallel):
    ref = _run(cfg_for(setup, "esft"), tmp_path / "one", 1)[0]
    got = _run(cfg_for(setup, "esft", **parallel), tmp_path / "many", 2)
    _same_losses(ref, got)
    a = load_file(str(tmp_path / "one" / "esft" / "model.safetensors"))
    b = load_file(str(tmp_path / "many" / "esft" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert {k.split(".experts.")[1].split(".")[0] for k in a if ".layers.1." in k} == {"1", "6"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    # the whole model behind the result: only the selected experts moved, every other tensor is the base's
    from moelab.dist.checkpoint import gather_full_model

    step = sorted((tmp_path / "many" / "checkpoints").glob("step-*"))[-1]
    trained, base = gather_full_model(step).state_dict(), moelab.load(setup["base"]).state_dict()
    moved = set()
    for k, w in base.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            for e in range(w.shape[0]):
                if not torch.equal(trained[k][e], w[e]):
                    moved.add((k.split(".")[2], e))
        else:
            assert torch.equal(trained[k], w), k
    assert moved == {("1", 1), ("1", 6), ("2", 2)}


def test_refused_under_torchrun(setup, tmp_path):
    for method, extra, words in [("plora", {}, "plora does not run under torchrun"),
                                 ("lora", {"parallel.ep": 2}, "cannot be split over expert-parallel ranks"),
                                 ("lora", {"parallel.data_parallel": "fsdp"}, "does not run under FSDP2")]:
        errors = run_ranks(_refusal, 2, cfg_for(setup, method, **extra).model_dump_json(), str(tmp_path / method))
        assert all(words in e and agreed for e, agreed in errors), errors


def _refusal(rank: int, world: int, cfg_json: str, run_dir: str) -> tuple[str, bool]:
    try:
        finetune(FinetuneConfig.model_validate_json(cfg_json), run_dir, progress=False)
    except ConfigError as e:
        return str(e), getattr(e, "agreed", False)
    return "no error", False
