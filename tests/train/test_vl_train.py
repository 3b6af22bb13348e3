"""The three DeepSeek-VL2 stages on the training loop, on generated data: align trains the adaptor (and the
encoder, or not) and leaves every language-model weight bit-identical; sft starts from align's checkpoint and
trains everything; a resumed run repeats an uninterrupted one's losses exactly; the final model reloads and
answers through `moelab vl chat`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moelab.cli import app
from moelab.errors import ConfigError
from moelab.interop.vl_checkpoint import export_vl_state_dict, load_vl
from moelab.train.vl_config import load_vl_run_config
from moelab.train.vl_job import build_model, train_vl
from moelab.vision.synth import generate

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "vl-tiny.toml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vl") / "data"
    generate(out, {"ocr": 10, "chart": 6, "shapes": 8}, seed=0)
    return out


def cfg_for(data, stage, steps=4, **extra):
    sets = [f"vl.stage={stage}", f"data.path={data / 'train.jsonl'}", f"train.steps={steps}", "train.batch_size=2",
            "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1", "train.ckpt_every=2",
            "train.log_every=1", "data.seq_len=256", "model.num_hidden_layers=2"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_vl_run_config(CONFIG, sets)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_align_then_sft(data, tmp_path):
    base = {n: t.clone() for n, t in export_vl_state_dict(build_model(cfg_for(data, "align"))[0])}   # the init
    _, summary = train_vl(cfg_for(data, "align"), tmp_path / "align", progress=False)
    assert summary["template"] == "plain" and summary["trainable"]["language"] == 0
    after = weights(tmp_path / "align")
    assert set(after) == set(base)
    for name, t in after.items():
        same = torch.equal(t, base[name])
        if name.startswith("language."):
            assert same, name                                   # the LM is frozen in stage 1
        elif name.startswith(("projector.", "image_newline", "view_seperator")):
            assert not same, name
    assert any(not torch.equal(t, base[n]) for n, t in after.items() if n.startswith("vision."))
    _, s2 = train_vl(cfg_for(data, "align", **{"vl.train_encoder": "false"}), tmp_path / "frozen", progress=False)
    enc = weights(tmp_path / "frozen")
    assert s2["trainable"]["vision"] == 0
    assert all(torch.equal(t, base[n]) for n, t in enc.items() if n.startswith(("vision.", "language.")))
    # stage 3 from stage 1's checkpoint, the same file naming the model: everything trains
    res, s3 = train_vl(cfg_for(data, "sft", **{"vl.init_from": str(tmp_path / "align" / "model")}),
                       tmp_path / "sft", progress=False)
    assert s3["template"] == "deepseek" and res.status == "finished" and s3["trainable"]["language"] > 0
    sft = weights(tmp_path / "sft")
    assert any(not torch.equal(t, after[n]) for n, t in sft.items() if n.startswith("language."))
    bias = [n for n in sft if n.endswith("e_score_correction_bias")]
    assert bias and all(torch.equal(after[n], base[n]) for n in bias)          # align: no balancing
    assert all(not torch.equal(sft[n], after[n]) for n in bias)                 # sft: loss-free bias moves
    model = load_vl(tmp_path / "sft" / "model")
    assert model.image_token_id == 264
    img = next((data / "images").glob("train-ocr-*.png"))
    r = CliRunner().invoke(app, ["vl", "chat", str(tmp_path / "sft" / "model"), "--image", str(img), "--prompt",
                                 "What is written in the image?", "--max-new-tokens", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert len(r.output.strip()) > 0
    (tmp_path / "empty.png").write_bytes(b"")
    for args, words in [(["--image", str(tmp_path / "empty.png"), "--prompt", "Read."], "empty"),
                        (["--image", str(img), "--prompt", "<image> and <image>"], "2 <image> placeholder")]:
        r = CliRunner().invoke(app, ["vl", "chat", str(tmp_path / "sft" / "model"), *args, "--device", "cpu"])
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    batch = tmp_path / "q.jsonl"
    batch.write_text(json.dumps({"prompt": "Read.", "image": str(img)}) + "\n" + "{oops\n")
    r = CliRunner().invoke(app, ["vl", "chat", str(tmp_path / "sft" / "model"), "--batch", str(batch)])
    assert r.exit_code == 1 and "q.jsonl:2" in r.output, r.output


def test_resume_repeats_the_losses(data, tmp_path):
    train_vl(cfg_for(data, "sft", steps=6), tmp_path / "a", progress=False)

    class Stop(Exception):
        pass

    def stop_at_4(kind, rec):
        if kind == "log" and rec["step"] == 4:
            raise Stop
    with pytest.raises(Stop):
        train_vl(cfg_for(data, "sft", steps=6), tmp_path / "b", progress=False, on_event=stop_at_4)
    rest, _ = train_vl(cfg_for(data, "sft", steps=6), tmp_path / "b", resume=True, progress=False)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert rest.step == 6 and all(a[k] == b[k] for k in (3, 4, 5, 6))


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
def test_compiled_and_checkpointed_blocks_give_the_eager_losses(data, tmp_path):
    """``train.compile`` and ``train.activation_checkpointing`` reach the language model's blocks of a
    vision-language model, and change nothing but speed and memory."""
    train_vl(cfg_for(data, "sft"), tmp_path / "eager", progress=False)
    eager = losses(tmp_path / "eager")
    for name, key in (("compiled", "train.compile"), ("checkpointed", "train.activation_checkpointing")):
        train_vl(cfg_for(data, "sft", **{key: "true"}), tmp_path / name, progress=False)
        got = losses(tmp_path / name)
        assert got.keys() == eager.keys() and all(got[k] == pytest.approx(eager[k], rel=1e-4) for k in eager), name


def test_config_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="freezes the language model"):
        cfg_for(data, "align", **{"balance.method": "loss_free"})
    train_vl(cfg_for(data, "align", steps=1), tmp_path / "one", progress=False)
    with pytest.raises(ConfigError, match="another model than the config's"):
        train_vl(cfg_for(data, "sft", **{"vl.init_from": str(tmp_path / "one" / "model"),
                                         "model.num_hidden_layers": 3}), tmp_path / "x", progress=False)
