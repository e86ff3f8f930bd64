"""compressor.evaluate: perplexity by the project's protocol, against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compressor import api
from compressor.calibration.sources import tokenize_text
from compressor.errors import InvalidInputError, NumericalError, UsageError
from compressor.evaluate import eval_windows, next_token_nll, perplexity, window_nll
from compressor.loading import LoadedModel


def _reference_nll(model, ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> tuple[float, int, int]:
    """Mean NLL of tokens 2..L over consecutive windows, each window its own forward pass."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    total, count = 0.0, 0
    for k in range(n):
        window = ids[k * seq_len : (k + 1) * seq_len]
        with torch.inference_mode():
            logits = model(input_ids=window[None]).logits[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # log-softmax by hand
        picked = logp[torch.arange(seq_len - 1), window[1:]]  # log p(token t+1 | tokens ≤ t)
        total -= float(picked.sum())
        count += seq_len - 1
    return total / count, count, n


@pytest.fixture(scope="module")
def llama_ids(tiny_llama, small_text_file):
    return tokenize_text(tiny_llama.tokenizer, small_text_file.read_text(encoding="utf-8"))


def test_perplexity_matches_hand_computation(tiny_llama, llama_ids):
    seq_len = 16
    nll, count, n = _reference_nll(tiny_llama.model, llama_ids, seq_len)
    result = perplexity(tiny_llama.model, llama_ids, seq_len=seq_len)
    assert result.windows == n == llama_ids.numel() // seq_len
    assert result.tokens == count == n * (seq_len - 1)
    assert result.seq_len == seq_len
    assert result.nll == pytest.approx(nll, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    # a random model over 320 tokens: perplexity of the order of the vocabulary
    assert 50 < result.perplexity < 2000
    assert result.seconds >= 0
    assert set(result.to_dict()) == {"perplexity", "nll", "tokens", "windows", "seq_len", "seconds"}


def test_max_windows(tiny_llama, llama_ids):
    nll, count, n = _reference_nll(tiny_llama.model, llama_ids, 16, max_windows=3)
    result = perplexity(tiny_llama.model, llama_ids, seq_len=16, max_windows=3)
    assert (result.windows, result.tokens) == (3, 45) == (n, count)
    assert result.nll == pytest.approx(nll, rel=1e-6)
    # more windows than there are: all of them
    everything = perplexity(tiny_llama.model, llama_ids, seq_len=16)
    capped = perplexity(tiny_llama.model, llama_ids, seq_len=16, max_windows=10_000)
    assert capped.windows == everything.windows
    assert capped.nll == pytest.approx(everything.nll, rel=1e-9)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batch_size_does_not_change_result(tiny_llama, llama_ids, batch_size):
    nll, _, _ = _reference_nll(tiny_llama.model, llama_ids, 16, max_windows=7)
    result = perplexity(tiny_llama.model, llama_ids, seq_len=16, max_windows=7, batch_size=batch_size)
    assert result.windows == 7
    assert result.nll == pytest.approx(nll, rel=1e-6)


def test_windows_are_consecutive_from_start():
    ids = torch.arange(50)
    w = eval_windows(ids, 8, None)
    assert w.shape == (6, 8)
    assert torch.equal(w.flatten(), torch.arange(48))
    assert eval_windows(ids, 8, 2).shape == (2, 8)


def test_window_nll_sums_tokens_2_to_L(tiny_llama, llama_ids):
    windows = eval_windows(llama_ids, 10, 2)
    per_window = window_nll(tiny_llama.model, windows)
    assert per_window.dtype == torch.float64 and per_window.shape == (2,)
    nll, count, _ = _reference_nll(tiny_llama.model, llama_ids, 10, max_windows=2)
    assert count == 18
    assert float(per_window.sum()) / 18 == pytest.approx(nll, rel=1e-6)


def test_fewer_tokens_than_a_window(tiny_llama, llama_ids):
    with pytest.raises(InvalidInputError, match="fewer than one window"):
        perplexity(tiny_llama.model, llama_ids[:15], seq_len=16)
    # exactly one window is enough
    assert perplexity(tiny_llama.model, llama_ids[:16], seq_len=16).windows == 1


@pytest.mark.parametrize("kwargs", [{"seq_len": 1}, {"max_windows": 0}, {"batch_size": 0}])
def test_bad_values(tiny_llama, llama_ids, kwargs):
    with pytest.raises(UsageError):
        perplexity(tiny_llama.model, llama_ids, **{"seq_len": 16, **kwargs})


def test_nan_model_is_numerical_error(llama_ids):
    """Loading refuses NaN weights (tests/test_bad_inputs.py); a model that produces NaN in
    memory is caught by perplexity itself."""
    from conftest import build_model

    model = build_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        perplexity(model, llama_ids, seq_len=16, max_windows=2)


def test_api_evaluate_on_file(tiny_llama, small_text_file):
    loaded = LoadedModel(tiny_llama.model, tiny_llama.tokenizer, "tiny", None)
    result = api.evaluate(loaded, small_text_file, seq_len=16, max_windows=4)
    ids = tokenize_text(tiny_llama.tokenizer, small_text_file.read_text(encoding="utf-8"))
    nll, _, _ = _reference_nll(tiny_llama.model, ids, 16, max_windows=4)
    assert result.nll == pytest.approx(nll, rel=1e-6)
    # also from a folder spec
    from_folder = api.evaluate(str(tiny_llama.path), small_text_file, seq_len=16, max_windows=4)
    assert from_folder.nll == pytest.approx(nll, rel=1e-6)


def test_api_evaluate_errors(tiny_llama, tiny_bert, tmp_path, small_text_file):
    loaded = LoadedModel(tiny_llama.model, tiny_llama.tokenizer, "tiny", None)
    with pytest.raises(InvalidInputError, match="not found"):
        api.evaluate(loaded, tmp_path / "missing.txt", seq_len=16)
    bert = LoadedModel(tiny_bert.model, tiny_bert.tokenizer, "tiny-bert", None)
    with pytest.raises(InvalidInputError, match="causal"):
        api.evaluate(bert, small_text_file, seq_len=16)


def test_next_token_nll_is_float64_accurate_on_a_full_vocabulary():
    # The (batch, vocab, seq) layout of torch's CPU cross-entropy sums with a bias of ~4e-6 here
    # (4e-5 on SmolLM2's logits, 0.014 % of its perplexity); the token-major one does not.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 65, 49152, generator=g) * 4
    ids = torch.randint(0, 49152, (2, 65), generator=g)
    reference = F.cross_entropy(logits[:, :-1].double().reshape(-1, 49152), ids[:, 1:].reshape(-1), reduction="sum")
    assert float(next_token_nll(logits, ids)) == pytest.approx(float(reference), rel=1e-6)
    per_token = next_token_nll(logits, ids, reduction="none").view(2, 65)
    assert torch.equal(per_token[:, -1], torch.zeros(2))  # the last position predicts nothing
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 49152), ids[:, 1:].reshape(-1), reduction="none").view(2, 64)
    torch.testing.assert_close(per_token[:, :-1], expected)
