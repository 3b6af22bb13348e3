"""Training under torchrun equals training in one process: 2-rank DP (FSDP2 and DDP), 2-rank EP, and a
4-rank dp 2 × ep 2 mesh run 10 optimizer steps of the tiny MoE (fp32, gloo processes on the CPU) on the
same global batches as a one-process run; the logged losses agree within 1e-5, the loss-free bias is
bit-identical on every rank and equal to the one-process bias, auxiliary losses are global. The real
entry point (``torchrun -m moelab train``) is run once, and a bad ``[parallel]`` section fails the same
way on every rank."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_configs import STEPS, run_config, run_toml
from ranks import run_ranks

from moelab.dist.mesh import ParallelConfig
from moelab.train.config import RunConfig
from moelab.train.loop import train


def _rank_worker(rank: int, world: int, cfg_json: str, run_dir: str) -> dict:
    cfg = RunConfig.model_validate_json(cfg_json)
    losses, evals = [], []
    import moelab.train.loop as loop

    built = {}
    original = loop.Trainer.__init__

    def remember(self, *a, **k):   # keep the trainer's model to read its routing biases afterwards
        original(self, *a, **k)
        built["model"] = self.model

    loop.Trainer.__init__ = remember
    train(cfg, run_dir, progress=False, on_event=lambda kind, rec: (losses if kind == "log" else evals).append(rec))
    biases = [m.gate.e_score_correction_bias.clone() for m in built["model"].modules()
              if hasattr(m, "gate") and getattr(m.gate, "e_score_correction_bias", None) is not None]
    return {"loss": [r["loss"] for r in losses], "aux": [r["aux_loss"] for r in losses],
            "maxvio": [r["maxvio_batch"] for r in losses], "val": [r["val_loss"] for r in evals],
            "bias": biases}


def _one_process(cfg: RunConfig, run_dir: Path) -> dict:
    """The reference run, in a fresh process too (nothing left behind by earlier tests in this one)."""
    return run_ranks(_rank_worker, 1, cfg.model_dump_json(), str(run_dir))[0]


def _compare(ref: dict, got: list[dict]) -> None:
    for r in got:
        assert len(r["loss"]) == STEPS
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(ref["loss"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r["aux"]), torch.tensor(ref["aux"]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(r["maxvio"]), torch.tensor(ref["maxvio"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(r["val"]), torch.tensor(ref["val"]), atol=1e-5, rtol=0)
    for layer in range(len(ref["bias"])):
        for r in got:           # bit-identical on every rank, and equal to one process'
            assert torch.equal(r["bias"][layer], got[0]["bias"][layer])
        torch.testing.assert_close(got[0]["bias"][layer], ref["bias"][layer], atol=0, rtol=0)


@pytest.mark.parametrize("world, parallel", [
    (2, {"ep": 1}),
    (2, {"ep": 1, "data_parallel": "ddp"}),
    (2, {"ep": 2}),
    (2, {"ep": 2, "data_parallel": "ddp"}),
], ids=["dp2-fsdp", "dp2-ddp", "ep2-fsdp", "ep2-ddp"])
def test_parallel_losses_equal_one_process(excerpt_tokens, tmp_path, world, parallel):
    ref = _one_process(run_config(excerpt_tokens), tmp_path / "one")
    cfg = run_config(excerpt_tokens, parallel)
    got = run_ranks(_rank_worker, world, cfg.model_dump_json(), str(tmp_path / "many"))
    _compare(ref, got)


def test_model_output_tensors_are_visible_to_fsdp():
    """FSDP2 registers its unshard-before-backward on the output tensors pytree finds (torch 2.11; 2.13 also
    looks inside dataclasses): LMOutput's logits must be among them, or the root's weights are freed before
    backward (fsdp runs above failed so on torch 2.11 before LMOutput was registered)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    from moelab.model.transformer import LMOutput

    logits = torch.randn(2, 3, 5, requires_grad=True)
    leaves, spec = tree_flatten(LMOutput(logits=logits))
    assert any(x is logits for x in leaves)
    back = tree_unflatten([x * 2 if isinstance(x, torch.Tensor) else x for x in leaves], spec)
    assert isinstance(back, LMOutput) and torch.equal(back.logits, logits * 2) and back.cache is None


@pytest.mark.slow
def test_dp2_ep2_mesh_equals_one_process(excerpt_tokens, tmp_path):
    ref = _one_process(run_config(excerpt_tokens), tmp_path / "one")
    got = run_ranks(_rank_worker, 4, run_config(excerpt_tokens, {"dp": 2, "ep": 2}).model_dump_json(),
                    str(tmp_path / "many"))
    _compare(ref, got)


def test_global_aux_losses(excerpt_tokens, tmp_path):
    """Expert-level and sequence-wise auxiliary losses (and their gradients) over the global batch."""
    bal = {"method": "aux_loss", "aux_alpha": 0.01, "seq_aux_alpha": 0.001}
    ref = _one_process(run_config(excerpt_tokens, balance=bal), tmp_path / "one")
    got = run_ranks(_rank_worker, 2, run_config(excerpt_tokens, {"ep": 2}, balance=bal).model_dump_json(),
                    str(tmp_path / "many"))
    assert ref["aux"][0] > 0
    for r in got:
        # fp32 reduction order differs across ranks; over 10 steps the drift reached 2e-5 relative (step 10)
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(ref["loss"]), atol=1e-5, rtol=5e-5)
        torch.testing.assert_close(torch.tensor(r["aux"]), torch.tensor(ref["aux"]), atol=1e-7, rtol=1e-5)


def test_torchrun_entry_point(excerpt_tokens, tmp_path):
    """``torchrun --nproc_per_node=2 -m moelab train`` with [parallel] ep = 2: one set of logs (rank 0), the
    final model consolidated into RUN_DIR/model, and the same losses as one process."""
    cfg = run_config(excerpt_tokens)
    (tmp_path / "c.toml").write_text(run_toml(cfg), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "moelab", "train", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("report:") == 1        # rank 0 speaks
    import json

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    from moelab.train.config import load_run_config

    same = load_run_config(tmp_path / "c.toml").model_copy(update={"parallel": ParallelConfig()})
    ref = _one_process(same, tmp_path / "one")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref["loss"]), atol=1e-5, rtol=0)
    import moelab

    model = moelab.load(tmp_path / "run" / "model")
    assert model.config.n_routed_experts == 8      # every expert, gathered from both ranks


def test_bad_mesh_fails_on_every_rank(excerpt_tokens, tmp_path):
    for parallel, words in [({"ep": 3}, "does not make the 2 ranks"), ({"dp": 2, "ep": 2}, "dp = 2 × ep = 2")]:
        with pytest.raises(AssertionError) as e:
            run_ranks(_rank_worker, 2, run_config(excerpt_tokens, parallel).model_dump_json(), str(tmp_path / "r"))
        assert str(e.value).count(words) == 2, str(e.value)[-2000:]     # both ranks, the same message


def test_resume_sharded_on_another_world_size(excerpt_tokens, tmp_path):
    """A 2-rank ep = 2 run's sharded step-5 checkpoint resumes in one process (resharded by DCP: experts
    gathered from both ranks, AdamW state included) and the last 5 losses equal the uninterrupted run's."""
    import shutil

    run = tmp_path / "run"
    cfg = run_config(excerpt_tokens, {"ep": 2}, ckpt_every=5)
    full = run_ranks(_rank_worker, 2, cfg.model_dump_json(), str(run))[0]
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-00000005", "step-00000010"]
    assert (ckpts[0] / "sharded" / ".metadata").is_file() and (run / "model" / "config.json").is_file()
    shutil.rmtree(ckpts[1])                                        # as if the job had died after step 5
    one = run_config(excerpt_tokens, ckpt_every=5).model_dump_json()
    resumed = run_ranks(_resume_worker, 1, one, str(run))[0]
    assert len(resumed["loss"]) == STEPS - 5
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(full["loss"][5:]), atol=1e-5, rtol=0)


def test_export_cli(excerpt_tokens, tmp_path):
    """`moelab export STEP_DIR --out DIR` of a 2-rank ep = 2 run's sharded checkpoint opens in transformers
    with the logits of the same training done in one process and saved the one-process way (no DCP, no
    export); a directory that is not sharded is refused."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    import moelab
    from moelab.cli import app

    run = tmp_path / "run"
    run_ranks(_rank_worker, 2, run_config(excerpt_tokens, {"ep": 2}).model_dump_json(), str(run))
    _one_process(run_config(excerpt_tokens), tmp_path / "one")
    step = run / "checkpoints" / "step-00000010"
    res = CliRunner().invoke(app, ["export", str(step), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    reference = moelab.load(tmp_path / "one" / "checkpoints" / "step-00000010" / "model")(ids).logits
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, reference, atol=1e-4, rtol=1e-4)
    bad = CliRunner().invoke(app, ["export", str(run / "model"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "not a sharded checkpoint" in bad.output


def _resume_worker(rank: int, world: int, cfg_json: str, run_dir: str) -> dict:
    losses = []
    train(RunConfig.model_validate_json(cfg_json), run_dir, resume=True, progress=False,
          on_event=lambda kind, rec: losses.append(rec) if kind == "log" else None)
    return {"loss": [r["loss"] for r in losses]}


@pytest.mark.slow
def test_resume_four_ranks_on_two(excerpt_tokens, tmp_path):
    """A dp 2 × ep 2 run's step-5 checkpoint resumes on 2 ranks with ep = 2 (experts and AdamW state
    resharded from (ep 2, dp 2) to (ep 2, dp 1)); the last 5 losses equal the uninterrupted run's."""
    import shutil

    run = tmp_path / "run"
    full = run_ranks(_rank_worker, 4, run_config(excerpt_tokens, {"dp": 2, "ep": 2}, ckpt_every=5).model_dump_json(),
                     str(run))[0]
    shutil.rmtree(run / "checkpoints" / "step-00000010")
    resumed = run_ranks(_resume_worker, 2, run_config(excerpt_tokens, {"ep": 2}, ckpt_every=5).model_dump_json(),
                        str(run))
    for r in resumed:
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(full["loss"][5:]), atol=1e-5, rtol=0)


def test_resume_with_another_model_fails_alike_on_every_rank(excerpt_tokens, tmp_path):
    """A sharded checkpoint resumed by a model of other shapes: the same one-line error on both ranks
    (marked for rank 0 to print), nobody left waiting."""
    run = tmp_path / "run"
    run_ranks(_rank_worker, 2, run_config(excerpt_tokens, {"ep": 2}, steps=2, ckpt_every=2).model_dump_json(),
              str(run))
    other = run_config(excerpt_tokens, {"ep": 2}, steps=2, ckpt_every=2)
    other.model = other.model.model_copy(update={"moe_intermediate_size": 24})
    got = run_ranks(_resume_refused, 2, other.model_dump_json(), str(run))
    assert all("does not fit this model" in msg and agreed for msg, agreed in got), got


def _resume_refused(rank: int, world: int, cfg_json: str, run_dir: str) -> tuple[str, bool]:
    from moelab.errors import MoelabError

    try:
        train(RunConfig.model_validate_json(cfg_json), run_dir, resume=True, progress=False, allow_config_change=True)
    except MoelabError as e:
        return str(e), getattr(e, "agreed", False)
    return "resumed", False


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("parallel", [{"ep": 1}, {"ep": 2}], ids=["dp2-fsdp", "ep2-fsdp"])
def test_compiled_blocks_under_torchrun(excerpt_tokens, tmp_path, parallel):
    """``train.compile = true`` (whole blocks) under FSDP2 and with expert parallelism (its exchange runs
    eagerly inside the compiled block): the losses of the eager one-process run."""
    ref = _one_process(run_config(excerpt_tokens), tmp_path / "one")
    cfg = run_config(excerpt_tokens, parallel, compile=True)
    got = run_ranks(_rank_worker, 2, cfg.model_dump_json(), str(tmp_path / "many"))
    _compare(ref, got)
