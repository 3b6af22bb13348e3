"""Training on a device, in two precisions, with activation checkpointing, and what a device refuses.

CPU tests run everywhere; tests marked ``cuda`` run on the GPU (``make test-gpu``) and are skipped
without one (``MOELAB_TEST_DEVICE=cpu`` dry-runs them on the CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import TINY_MOE
from typer.testing import CliRunner

from moelab.cli import app
from moelab.config import make_config
from moelab.errors import CheckpointError, ConfigError, TrainingError
from moelab.interop.checkpoint import load
from moelab.train.config import RunConfig
from moelab.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def run_config(data: Path, model: dict | None = None, balance: dict | None = None, **train_kw) -> RunConfig:
    t = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, eval_every=3, eval_batches=2,
             ckpt_every=3, keep_last=5, dtype="float32", seed=0, device="cpu")
    t.update(train_kw)
    return RunConfig(model=make_config(TINY_MOE | (model or {})), data={"path": str(data), "seq_len": 32},
                     train=t, balance=balance or {})


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.float().cpu() for k, v in load(run_dir / "model").state_dict().items()}


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
def test_float16_and_contradictory_precisions_are_refused_in_one_line(excerpt_tokens):
    with pytest.raises(ValueError, match="float16' is not supported: fp16 training needs a gradient scaler"):
        run_config(excerpt_tokens, dtype="float16")
    with pytest.raises(ValueError, match="weights_dtype = 'bfloat16' computes in bfloat16"):
        run_config(excerpt_tokens, weights_dtype="bfloat16", dtype="float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(excerpt_tokens, tmp_path):
    with pytest.raises(ConfigError, match=r"^train.device = cuda: CUDA is not available on this machine"):
        train(run_config(excerpt_tokens, device="cuda"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    toml = tmp_path / "c.toml"
    toml.write_text(f'[model]\nvocab_size = 320\n[data]\npath = "{excerpt_tokens}"\n[train]\nsteps = 2\n')
    r = CliRunner().invoke(app, ["train", str(toml), "--out", str(tmp_path / "r2"), "--set", "train.device=cuda:1"])
    assert r.exit_code == 1 and "train.device = cuda:1: CUDA is not available" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "r2").exists()


def test_auto_is_the_cpu_here_and_resume_may_change_the_device(excerpt_tokens, tmp_path):
    first = train(run_config(excerpt_tokens, steps=6, device="auto"), tmp_path / "r", progress=False)
    assert first.status == "finished"
    # an older record without the new settings resumes (they read as their defaults), and train.device is free
    rec = json.loads((tmp_path / "r" / "config.json").read_text())
    for key in ("device", "weights_dtype", "activation_checkpointing"):
        rec["train"].pop(key)
    (tmp_path / "r" / "config.json").write_text(json.dumps(rec))
    again = train(run_config(excerpt_tokens, steps=9, device="cpu"), tmp_path / "r", resume=True, progress=False,
                  allow_config_change=True)
    assert again.step == 9
    change = json.loads((tmp_path / "r" / "config_changes.jsonl").read_text().splitlines()[-1])
    assert set(change["changes"]) == {"train.steps", "train.device"}


def test_resume_with_another_model_shape_says_the_shape_stays(excerpt_tokens, tmp_path):
    train(run_config(excerpt_tokens, steps=3), tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match=r"has shape .*A run keeps its model's shape .*undo the change"):
        train(run_config(excerpt_tokens, model=dict(moe_intermediate_size=24), steps=6), tmp_path / "r", resume=True,
              progress=False, allow_config_change=True)


# ------------------------------------------------------------------------------------------------
# activation checkpointing: the same run, less memory
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("balance", [{"method": "loss_free"}, {"method": "aux_loss", "seq_aux_alpha": 1e-3}])
def test_activation_checkpointing_changes_nothing_but_memory(excerpt_tokens, tmp_path, balance):
    """fp32 on the CPU: the recomputed blocks give the same losses, balance statistics and weights bit for bit
    (each token's experts counted once, each auxiliary loss added once)."""
    model = {"first_k_dense_replace": 1} if balance["method"] == "aux_loss" else {}
    if balance["method"] == "aux_loss":
        model |= {"scoring_func": "softmax", "topk_method": "greedy"}
    a = train(run_config(excerpt_tokens, model, balance), tmp_path / "plain", progress=False)
    b = train(run_config(excerpt_tokens, model, balance, activation_checkpointing=True), tmp_path / "ckpt",
              progress=False)
    assert a.step == b.step == 6
    keys = ("loss", "aux_loss", "grad_norm", "maxvio_batch", "val_loss", "maxvio_global")
    pick = [{k: r[k] for k in keys if k in r} for r in metrics(tmp_path / "plain")]
    assert pick == [{k: r[k] for k in keys if k in r} for r in metrics(tmp_path / "ckpt")]
    if balance["method"] == "aux_loss":
        assert any(r.get("aux_loss", 0) > 0 for r in metrics(tmp_path / "ckpt"))
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_activation_checkpointing_keeps_fewer_tensors_for_backward():
    from tiny import tiny_config

    from moelab.model.transformer import DeepSeekForCausalLM
    from moelab.train.checkpointing import enable_activation_checkpointing

    def saved_bytes(model) -> int:
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t
        x = torch.randint(0, 320, (4, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).logits.sum()
        return sum(total)

    cfg = tiny_config(num_hidden_layers=4)
    plain = saved_bytes(DeepSeekForCausalLM.from_config(cfg, seed=0))
    ckpt_model = DeepSeekForCausalLM.from_config(cfg, seed=0)
    assert enable_activation_checkpointing(ckpt_model) == 4
    assert saved_bytes(ckpt_model) < plain / 3


# ------------------------------------------------------------------------------------------------
# pure bf16 weights, and out of memory
# ------------------------------------------------------------------------------------------------
def test_bf16_weights_train_save_and_resume(excerpt_tokens, tmp_path):
    cfg = run_config(excerpt_tokens, dtype="bfloat16", weights_dtype="bfloat16", steps=6)
    r = train(cfg, tmp_path / "r", progress=False)
    ls = losses(tmp_path / "r")
    assert r.status == "finished" and all(torch.isfinite(torch.tensor(ls))) and ls[-1] < ls[0]
    model = load(tmp_path / "r" / "model")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.gate.e_score_correction_bias.dtype == torch.float32   # the bias stays fp32
    again = train(run_config(excerpt_tokens, dtype="bfloat16", weights_dtype="bfloat16", steps=8), tmp_path / "r",
                  resume=True, progress=False, allow_config_change=True)
    assert again.step == 8


def test_out_of_memory_names_the_micro_batch_and_keeps_the_last_checkpoint(excerpt_tokens, tmp_path, monkeypatch):
    """The device's out-of-memory error (raised here at the third step's forward) becomes one message."""
    from moelab.model.transformer import DeepSeekForCausalLM

    forward, calls = DeepSeekForCausalLM.forward, []

    def failing(self, *a, **k):
        if self.training:
            calls.append(1)
            if len(calls) == 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, *a, **k)
    monkeypatch.setattr(DeepSeekForCausalLM, "forward", failing)
    with pytest.raises(TrainingError) as e:
        train(run_config(excerpt_tokens, ckpt_every=3, steps=6), tmp_path / "r", progress=False)
    msg = str(e.value)
    assert "out of memory on cpu at step 4 with micro-batches of 4 × 32 tokens" in msg
    assert "train.activation_checkpointing = true" in msg and "train.grad_accum" in msg
    assert msg.endswith("to keep 4 sequences per step)") and "step-00000003" in msg
    assert (tmp_path / "r" / "checkpoints" / "step-00000003" / "train_state.pt").is_file()


# ------------------------------------------------------------------------------------------------
# on the GPU (marker cuda)
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("expert_impl", ["fused", "grouped_mm", "padded_bmm", "loop"])
def test_gpu_run_follows_the_cpu_run(excerpt_tokens, tmp_path, gpu, expert_impl):
    """20 steps under bf16 autocast with fp32 master weights: the GPU losses follow the CPU's (same
    init, same batches) within bf16 tolerance."""
    kw = dict(steps=20, dtype="bfloat16", eval_every=10, ckpt_every=10, log_every=1)
    model = {"expert_impl": expert_impl}
    train(run_config(excerpt_tokens, model, device="cpu", **kw), tmp_path / "cpu", progress=False)
    train(run_config(excerpt_tokens, model, device=str(gpu), **kw), tmp_path / "gpu", progress=False)
    a, b = torch.tensor(losses(tmp_path / "cpu")), torch.tensor(losses(tmp_path / "gpu"))
    assert len(a) == len(b) == 20 and b[-1] < b[0] - 0.3
    assert float((a - b).abs().max()) < 0.05 * float(a.max())


@pytest.mark.cuda
def test_checkpoints_move_between_gpu_and_cpu(excerpt_tokens, tmp_path, gpu):
    """A run started on the GPU resumes on the CPU and back; a GPU checkpoint loads on the CPU."""
    kw = dict(dtype="float32", ckpt_every=3, lr_schedule="constant", warmup_steps=0)   # total steps may change
    train(run_config(excerpt_tokens, device=str(gpu), steps=3, **kw), tmp_path / "r", progress=False)
    train(run_config(excerpt_tokens, device="cpu", steps=6, **kw), tmp_path / "r", resume=True, progress=False,
          allow_config_change=True)
    r = train(run_config(excerpt_tokens, device=str(gpu), steps=9, **kw), tmp_path / "r", resume=True,
              progress=False, allow_config_change=True)
    assert r.step == 9 and len(losses(tmp_path / "r")) == 9
    cpu_model = load(tmp_path / "r" / "model", device="cpu")
    assert cpu_model.device.type == "cpu"
    # fp32 resume is exact across devices up to kernel rounding: the same run on the CPU alone is close
    train(run_config(excerpt_tokens, device="cpu", steps=9, **kw), tmp_path / "c", progress=False)
    a, b = torch.tensor(losses(tmp_path / "r")), torch.tensor(losses(tmp_path / "c"))
    assert float((a - b).abs().max()) < 1e-3


@pytest.mark.cuda
def test_bf16_weights_and_activation_checkpointing_on_the_gpu(excerpt_tokens, tmp_path, gpu):
    r = train(run_config(excerpt_tokens, device=str(gpu), dtype="bfloat16", weights_dtype="bfloat16",
                         activation_checkpointing=True, steps=10), tmp_path / "r", progress=False)
    ls = losses(tmp_path / "r")
    assert r.status == "finished" and ls[-1] < ls[0]


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
def test_compiled_blocks_follow_eager_without_graph_breaks(excerpt_tokens, tmp_path, cpu_and_gpu, monkeypatch):
    """``train.compile = true`` (bf16 autocast, fp32 master weights), on the CPU and the GPU: every block
    compiles as one graph (no break: no host sync inside a block, the whole training path included) and
    the losses follow the eager run's."""
    from torch._dynamo.utils import counters

    from moelab.model import experts

    monkeypatch.setattr(experts, "LOWP_CPU_ALIGN", 1)   # group bf16 experts as CUDA does (the CPU aligns: a host read)
    kw = dict(steps=10, dtype="bfloat16", eval_every=10, ckpt_every=10, log_every=1, device=str(cpu_and_gpu))
    train(run_config(excerpt_tokens, **kw), tmp_path / "eager", progress=False)
    counters.clear()
    train(run_config(excerpt_tokens, compile=True, **kw), tmp_path / "compiled", progress=False)
    assert not counters["graph_break"], list(counters["graph_break"])
    a, b = torch.tensor(losses(tmp_path / "eager")), torch.tensor(losses(tmp_path / "compiled"))
    assert len(a) == len(b) == 10
    assert float((a - b).abs().max()) < 0.02 * float(a.max())
