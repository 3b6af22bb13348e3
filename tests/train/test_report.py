"""End-of-run report: files written, numbers in summary.md against hand computation, bad inputs."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from moelab.errors import ConfigError, MoelabError
from moelab.train.report import read_metrics, smooth, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_STEPS, TOKENS_PER_STEP = 300, 4096
VAL_LOSS = {99: 4.0, 199: 3.0, 299: 3.5}  # best (199) is not the last (299)


def _train_line(s: int) -> dict:
    return {
        "step": s, "tokens": (s + 1) * TOKENS_PER_STEP, "loss": 3.0 + 7.0 * math.exp(-s / 50) + 0.05 * math.sin(s),
        "lr": 1e-3 if s < 240 else 3.16e-4, "tokens_per_s": 1000.0 + s, "maxvio_batch": 0.2 + math.exp(-s / 30),
        "grad_norm": 1.0,  # an extra key, ignored
    }


def _eval_line(s: int) -> dict:
    v = VAL_LOSS[s]
    return {"step": s, "tokens": (s + 1) * TOKENS_PER_STEP, "val_loss": v, "val_ppl": math.exp(v),
            "val_bpb": v / math.log(2) / 4.0, "maxvio_global": 0.1 + s / 1000}


def _write_run(run_dir, tail: str = "", load: bool = True) -> list[dict]:
    lines = []
    for s in range(N_STEPS):
        lines.append(_train_line(s))
        if s in VAL_LOSS:
            lines.append(_eval_line(s))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    if load:
        share = np.array([[0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]] + [[0.125] * 8] * 2)
        np.save(run_dir / "expert_load.npy", share)
        (run_dir / "expert_load_layers.json").write_text(json.dumps([1, 2, 3]))
    return lines


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR comes first
    assert width >= 300 and height >= 200


def test_smooth_matches_brute_force_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(57)
    x[[3, 4, 5, 6, 30]] = np.nan
    for window in (1, 2, 3, 7, 100):
        got = smooth(x, window)
        want = []
        for i in range(len(x)):
            w = x[max(0, i - window + 1) : i + 1]
            w = w[np.isfinite(w)]
            want.append(w.mean() if w.size else np.nan)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert smooth([], 5).shape == (0,)


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_smooth_rejects_bad_window(window):
    with pytest.raises(ConfigError, match="window"):
        smooth([1.0, 2.0], window)


def test_write_report_files_and_numbers(tmp_path):
    run = tmp_path / "run"
    lines = _write_run(run)
    summary = write_report(run)
    out = run / "report"
    assert summary == out / "summary.md"
    for name in ("loss.png", "maxvio.png", "expert_load.png"):
        _assert_png(out / name)
    text = summary.read_text()
    # Oracles computed here from the lines written, not from the report's own code.
    train = [r for r in lines if "loss" in r]
    last100 = [r for r in train if r["step"] > N_STEPS - 1 - 100]
    assert len(last100) == 100
    expected = [
        f"{VAL_LOSS[299]:.4f}", f"{math.exp(VAL_LOSS[299]):.2f}",  # final val loss, ppl
        f"{VAL_LOSS[299] / math.log(2) / 4:.4f}",  # final bpb
        "best val loss (step 199) | 3.0000", f"{math.exp(3.0):.2f}",  # best
        f"{0.1 + 299 / 1000:.4f}",  # final MaxVio_global
        f"{np.mean([r['maxvio_batch'] for r in last100]):.4f}",  # MaxVio_batch, last 100 steps
        f"{N_STEPS * TOKENS_PER_STEP:,}",  # tokens seen
        f"{np.median([r['tokens_per_s'] for r in train]):,.0f}",  # throughput
        "![loss](loss.png)", "![maxvio](maxvio.png)", "![expert load](expert_load.png)",
        "0.5000 = 4.00× uniform (layer 1, expert 0)",
    ]
    for s in expected:
        assert s in text, f"{s!r} missing from summary.md:\n{text}"
    assert "incomplete" not in text
    # Regenerating is idempotent and leaves no temporary files behind.
    write_report(run)
    assert sorted(p.name for p in out.iterdir()) == ["expert_load.png", "loss.png", "maxvio.png", "summary.md"]


def test_truncated_last_line_is_skipped(tmp_path):
    run = tmp_path / "run"
    _write_run(run, tail='{"step": 300, "tokens": 1232896, "loss": 3.0', load=False)
    m = read_metrics(run / "metrics.jsonl")
    assert m.skipped_last_line and m.n_train == N_STEPS and m.n_evals == 3
    text = write_report(run).read_text()
    assert f"{N_STEPS * TOKENS_PER_STEP:,}" in text and "incomplete" in text
    _assert_png(run / "report" / "loss.png")
    _assert_png(run / "report" / "maxvio.png")


def test_no_expert_load_skips_heatmap_and_removes_stale_one(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    write_report(run)
    (run / "expert_load.npy").unlink()
    text = write_report(run).read_text()
    assert not (run / "report" / "expert_load.png").exists()
    assert "expert_load.png" not in text


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(MoelabError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_corrupt_middle_line_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\nnot json\n{"step": 1, "loss": 1.0}\n')
    with pytest.raises(MoelabError, match=r"metrics.jsonl:2 "):
        write_report(tmp_path)


def test_metrics_without_any_usable_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(MoelabError, match="no training lines"):
        write_report(tmp_path)


def test_expert_load_layers_must_match_rows(tmp_path):
    _write_run(tmp_path)
    (tmp_path / "expert_load_layers.json").write_text("[1, 2]")
    with pytest.raises(MoelabError, match="3 integer layer indices"):
        write_report(tmp_path)
