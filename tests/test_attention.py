"""Chunked causal attention against torch's own causal SDPA, alone and inside real model classes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from compressor import attention
from compressor.attention import chunked_causal_attention

from conftest import VOCAB


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("length", [5, 17, 64, 65, 130])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_chunks_equal_causal_sdpa(length, kv_heads, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 4, length, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, length, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, length, 8, generator=g, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4, scale=0.3)
    calls = []

    def stock(*args, **kwargs):
        calls.append(args)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)

    chunked = attention._chunked_sdpa(stock)
    module = _Module()
    module.num_key_value_groups = 4 // kv_heads
    with torch.no_grad():
        out, weights = chunked(module, q, k, v, None, scaling=0.3)
    assert weights is None
    assert out.shape == (2, length, 4, 8)  # transformers' layout: (batch, seq, heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)
    assert len(calls) == (length <= 16)  # short sequences go to the stock function


def test_falls_back_whenever_chunks_would_differ(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 4)
    q = torch.randn(1, 2, 12, 8)
    mask = torch.ones(12, 12, dtype=torch.bool)
    calls = []

    def stock(module, *args, **kwargs):
        calls.append(kwargs)
        return "stock", None

    chunked = attention._chunked_sdpa(stock)
    causal, bidirectional = _Module(), _Module()
    bidirectional.is_causal = False
    with torch.no_grad():
        assert chunked(bidirectional, q, q, q, None)[0] == "stock"
        assert chunked(causal, q, q, q, mask)[0] == "stock"  # padding or custom masks
        assert chunked(causal, q, q[:, :, :6], q[:, :, :6], None)[0] == "stock"  # cache: queries ≠ keys
        assert chunked(causal, q, q, q, None, dropout=0.1)[0] == "stock"
        assert chunked(causal, q, q, q, None, sliding_window=4)[0] == "stock"
    with torch.enable_grad():
        assert chunked(causal, q, q, q, None)[0] == "stock"  # backward gains nothing
    with torch.no_grad():
        assert chunked(causal, q, q, q, None)[0] != "stock"
    assert len(calls) == 6


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert"])
def test_models_give_the_same_outputs(kind, request, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    model = request.getfixturevalue(f"tiny_{kind}").model
    chunks = []

    def spy(*args, **kwargs):
        chunks.append(args[0].shape[2])
        return F.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "F", SimpleNamespace(scaled_dot_product_attention=spy))
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(input_ids=ids)[0]
        with chunked_causal_attention():
            assert hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "stock")
            with chunked_causal_attention():  # nested: still one layer of chunking
                assert not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"].stock, "stock")
            got = model(input_ids=ids)[0]
    assert not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "stock")  # restored
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert chunks == ([] if kind == "bert" else [8] * 5 * model.config.num_hidden_layers)


def test_restored_after_an_error():
    with pytest.raises(RuntimeError):
        with chunked_causal_attention():
            raise RuntimeError("boom")
    assert not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "stock")


def test_a_local_sdpa_override_is_left_alone(monkeypatch):
    from transformers.modeling_utils import AttentionInterface

    def own(*args, **kwargs):
        raise AssertionError("not called here")

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", own)
    stock = AttentionInterface._global_mapping["sdpa"]
    with chunked_causal_attention():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is own
    assert AttentionInterface._global_mapping["sdpa"] is stock
