"""Causal self-attention on the CPU in query chunks, for the passes that only read activations.

Torch's CPU flash-attention kernel splits the keys in blocks of 512, so at the calibration
length of 512 tokens it computes the whole score matrix and masks half of it away: causal
attention costs as much as full attention. Cut into query chunks of QUERY_CHUNK rows, each
attending to the keys up to its own end, the masked work shrinks to one chunk's triangle
(19 vs 28 ms per SmolLM2 layer for 8 windows, ``benchmarks/cpu_ops.py``; backward gains
nothing, so passes with gradients keep the stock kernel). The result is the same
attention, up to rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

QUERY_CHUNK = 64


def _chunked_sdpa(stock):
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        length = query.shape[2]
        if (
            query.device.type != "cpu"
            or torch.is_grad_enabled()
            or not causal
            or attention_mask is not None
            or dropout
            or length != key.shape[2]
            or length <= QUERY_CHUNK
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "sliding_window", "s_aux"))
            or kwargs.get("output_attentions")
        ):
            return stock(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        gqa = query.shape[1] != key.shape[1]
        out = None  # allocated at the first chunk, in the dtype attention yields (autocast may lower it)
        visible = torch.ones(QUERY_CHUNK, length, dtype=torch.bool, device=query.device)
        for start in range(0, length, QUERY_CHUNK):
            end = min(start + QUERY_CHUNK, length)
            mask = visible[: end - start, :end].tril(start)
            part = F.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, :end], value[:, :, :end], attn_mask=mask, scale=scaling, enable_gqa=gqa
            )
            if out is None:
                out = part.new_empty(*query.shape[:3], value.shape[-1])
            out[:, :, start:end] = part
        return out.transpose(1, 2).contiguous(), None

    attention.stock = stock
    return attention


@contextlib.contextmanager
def chunked_causal_attention() -> Iterator[None]:
    """Within the block, transformers' ``sdpa`` attention runs causal CPU passes without
    gradients in query chunks; everything else goes to the stock function unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    overridden = "sdpa" in getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {})  # someone's own sdpa: keep it
    if hasattr(current, "stock") or overridden:  # already inside, or not ours to wrap
        yield
        return
    AttentionInterface.register("sdpa", _chunked_sdpa(current))
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", current)
