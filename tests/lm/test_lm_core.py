"""The model-facing core (:mod:`moelab.lm`): one NLL, one logits function, one left padding.

Oracles: three perplexities of the same tiny random moelab model on the same validation tokens and
windows, measured by training's evaluation, by ``moelab eval ppl``'s scorer and by the pruning study,
must agree; the token NLL must equal a per-token ``-log_softmax`` loop in float64; left padding must equal
a hand-built batch; both kinds of model (moelab, transformers) go through the same logits function.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_MOE

from moelab.config import make_config
from moelab.data.tokens import TokenData
from moelab.errors import MoelabError
from moelab.lm.logits import context_length, forward_logits, is_moelab, model_device
from moelab.lm.nll import IGNORE, lm_loss, token_nll
from moelab.lm.padding import left_pad
from moelab.model.transformer import DeepSeekForCausalLM

EXCERPT = Path(__file__).resolve().parents[1] / "assets" / "shakespeare_excerpt.txt"
MOE = TINY_MOE | {"first_k_dense_replace": 1}     # tests/support/tiny.py
SEQ_LEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def data_dir(excerpt_tokens) -> Path:
    return excerpt_tokens            # conftest.py: the Shakespeare excerpt as a token directory


@pytest.fixture(scope="module")
def moe() -> DeepSeekForCausalLM:
    return DeepSeekForCausalLM.from_config(make_config(MOE), seed=0).eval()


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


# -- one perplexity ---------------------------------------------------------------------------------

def three_losses(model, data_dir: Path) -> tuple[dict, object, float, int]:
    """Training's validation result, ``eval ppl``'s result and the pruning perplexity, all on the
    consecutive windows ``tokens[kT : kT + T + 1]`` (k < W) of the validation split."""
    from moelab.analysis.pruning import perplexity as pruning_perplexity
    from moelab.evaluate.perplexity import Stream, score_stream
    from moelab.train.loop import evaluate

    val = TokenData(data_dir, "val")
    W = val.n_eval_windows(SEQ_LEN)
    # (a) training: consecutive windows, every next token (EOS included) a target
    a = evaluate(model, val, batch_size=4, seq_len=SEQ_LEN, max_batches=10**6, dtype="float32")
    # (b) eval ppl: the same tokens as one stream, position 0 context only, non-overlapping windows
    ids = np.asarray(val.tokens[:W * SEQ_LEN + 1], dtype=np.int64)
    scored = np.ones(len(ids), dtype=bool)
    scored[0] = False
    b = score_stream(model, Stream(ids, scored, bytes=0, documents=1), SEQ_LEN, stride=SEQ_LEN, batch_size=3)
    # (c) pruning: each window a sample of T + 1 tokens, its last T tokens the targets
    samples = [torch.from_numpy(ids[k * SEQ_LEN:(k + 1) * SEQ_LEN + 1]) for k in range(W)]
    c = pruning_perplexity(model, samples, batch_size=5)
    return a, b, c, W


def test_training_eval_ppl_and_pruning_perplexities_agree(moe, data_dir):
    a, b, c, W = three_losses(moe, data_dir)
    assert W >= 10                                    # several batches in each of the three batchings
    assert a["val_tokens"] == b.tokens == W * SEQ_LEN and b.windows == W
    assert b.loss == pytest.approx(a["val_loss"], rel=1e-5)
    assert b.ppl == pytest.approx(a["val_ppl"], rel=1e-5)
    assert c == pytest.approx(a["val_ppl"], rel=1e-5)
    assert c == pytest.approx(b.ppl, rel=1e-5)
    assert 100 < b.ppl < 1000                         # an untrained model: near the vocabulary size


# -- the NLL against brute force --------------------------------------------------------------------

def brute_force_nll(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> tuple[float, int]:
    total, n = 0.0, 0
    for b in range(targets_BT.shape[0]):
        for t in range(targets_BT.shape[1]):
            y = int(targets_BT[b, t])
            if y == IGNORE:
                continue
            total -= float(F.log_softmax(logits_BTV[b, t].double(), dim=-1)[y])
            n += 1
    return total, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_nll_equals_a_per_token_loop(dtype):
    g = torch.Generator().manual_seed(3)
    logits_BTV = torch.randn(3, 9, 50, generator=g) * 4
    targets_BT = torch.randint(0, 50, (3, 9), generator=g)
    targets_BT[torch.rand(3, 9, generator=g) < 0.3] = IGNORE
    targets_BT[1] = IGNORE                            # a row with no target at all
    want, n = brute_force_nll(logits_BTV, targets_BT)
    total, count = token_nll(logits_BTV, targets_BT, dtype)
    assert count == n == int((targets_BT != IGNORE).sum()) > 0
    assert total == pytest.approx(want, rel=1e-6)
    # bf16 logits are scored in fp32, as under autocast
    half, _ = token_nll(logits_BTV.bfloat16(), targets_BT, dtype)
    assert half == pytest.approx(brute_force_nll(logits_BTV.bfloat16().float(), targets_BT)[0], rel=1e-6)
    assert token_nll(logits_BTV, torch.full_like(targets_BT, IGNORE), dtype) == (0.0, 0)


def test_token_nll_fp32_is_training_cross_entropy_bit_for_bit():
    # the drop-in promise for train.loop's evaluate(): the same kernel, the same sum
    g = torch.Generator().manual_seed(4)
    logits_BTV = torch.randn(4, 16, 320, generator=g)
    y_BT = torch.randint(0, 320, (4, 16), generator=g)
    y_BT[0, :5] = IGNORE
    want = F.cross_entropy(logits_BTV.flatten(0, 1), y_BT.flatten(), reduction="sum", ignore_index=IGNORE)
    assert token_nll(logits_BTV, y_BT) == (float(want), 59)
    loss = lm_loss(logits_BTV, y_BT)
    assert float(loss) == pytest.approx(float(want) / 59, rel=1e-6)
    none = lm_loss(logits_BTV.clone().requires_grad_(), torch.full_like(y_BT, IGNORE))
    assert float(none.detach()) == 0.0 and none.requires_grad  # backward() still runs on a prompt-only batch
    with pytest.raises(MoelabError, match="float32 or torch.float64"):
        token_nll(logits_BTV, y_BT, torch.float16)


# -- left padding -----------------------------------------------------------------------------------

def test_left_pad_ragged_prompts():
    ids_BT, mask_BT = left_pad([[5, 6, 7], [9], [], [4, 3]], pad_id=2)
    assert ids_BT.dtype == mask_BT.dtype == torch.int64
    assert ids_BT.tolist() == [[5, 6, 7], [2, 2, 9], [2, 2, 2], [2, 4, 3]]
    assert mask_BT.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 1]]


# -- logits of both kinds of model ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["moe", "llama"])
def test_both_kinds_of_model_give_logits(kind, moe, llama):
    model = moe if kind == "moe" else llama
    assert is_moelab(model) == (kind == "moe")
    assert context_length(model) == 256 and model_device(model) == torch.device("cpu")
    g = torch.Generator().manual_seed(5)
    ids_BT = torch.randint(3, 320, (2, 7), generator=g)
    with torch.no_grad():
        logits_BTV = forward_logits(model, ids_BT)
        last_B1V = forward_logits(model, ids_BT, last_only=True)
        # a left-padded short row predicts as it does alone: the mask keeps the padding out
        short = ids_BT[1, 3:].tolist()
        pad_BT, mask_BT = left_pad([ids_BT[0].tolist(), short], pad_id=2)
        padded_BTV = forward_logits(model, pad_BT, mask_BT)
        alone_BTV = forward_logits(model, torch.tensor([short]))
    assert logits_BTV.shape == (2, 7, 320) and logits_BTV.dtype == torch.float32
    assert last_B1V.shape == (2, 1, 320)
    torch.testing.assert_close(last_B1V[:, 0], logits_BTV[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_BTV[0], logits_BTV[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_BTV[1, 3:], alone_BTV[0], rtol=1e-4, atol=1e-4)


def test_old_names_are_the_core_functions():
    import moelab.analysis.activation as activation
    import moelab.evaluate.lm as evaluate_lm

    assert evaluate_lm.forward_logits is activation.lm_logits is forward_logits
    assert evaluate_lm.left_pad is left_pad and evaluate_lm.is_moelab is is_moelab
    assert evaluate_lm.context_length is context_length and evaluate_lm.model_device is model_device


def test_the_core_imports_no_stage():
    stages = ("train", "tune", "analysis", "evaluate", "data", "infer")
    code = ("import sys, torch; import moelab.lm.logits as L, moelab.lm.nll, moelab.lm.padding; "
            "L.is_moelab(torch.nn.Linear(1, 1)); "
            f"print(sorted(m for m in sys.modules if m.split('.')[:2][-1] in {stages!r} "
            "and m.startswith('moelab.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
