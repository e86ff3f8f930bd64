"""Two CPU kernels behind the calibration passes, timed at SmolLM2's shapes (run it alone).

    python benchmarks/cpu_ops.py

1. Causal attention of one layer (8 windows of 512 tokens, 9 query and 3 key/value heads
   of 64, bfloat16): torch's scaled_dot_product_attention with is_causal, the same without
   the mask, and compressor.attention's query chunks.
2. Cross-entropy over the 49,152-token vocabulary for one 512-token window, in the
   (batch, vocab, seq) layout of a transposed call and token-major, float32 and bfloat16,
   with each one's error against float64, of the loss and of its gradient.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from compressor.attention import _chunked_sdpa


def timed(fn, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round((time.perf_counter() - start) / repeats * 1000, 2)


def attention() -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 9, 512, 64, generator=g).bfloat16()
    k, v = (torch.randn(8, 3, 512, 64, generator=g).bfloat16() for _ in range(2))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=3)
    chunked = _chunked_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"])
    with torch.inference_mode():
        return {
            "causal_sdpa_ms": timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
            "full_sdpa_ms": timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
            "query_chunks_ms": timed(lambda: chunked(module, q, k, v, None)),
        }


def cross_entropy() -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 511, 49152, generator=g) * 4
    labels = torch.randint(0, 49152, (1, 511), generator=g)
    exact = logits.double().requires_grad_()
    loss = F.cross_entropy(exact[0], labels[0], reduction="sum")
    loss.backward()
    reference, reference_grad = float(loss.detach()), exact.grad
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        name = str(dtype).removeprefix("torch.")
        for layout, call in (
            ("transposed", lambda x: F.cross_entropy(x.transpose(1, 2), labels, reduction="sum")),
            ("token_major", lambda x: F.cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1), reduction="sum")),
        ):
            def step(call=call, x=x):
                leaf = x.detach().requires_grad_()
                call(leaf).backward()

            results[f"{name}_{layout}_forward_backward_ms"] = timed(step)
            results[f"{name}_{layout}_relative_error"] = float(call(x)) / reference - 1
            leaf = x.detach().requires_grad_()
            call(leaf).backward()
            error = (leaf.grad.double() - reference_grad).norm() / reference_grad.norm()
            results[f"{name}_{layout}_gradient_relative_error"] = float(error)
    return results


def main() -> None:
    print(json.dumps({"threads": torch.get_num_threads(), "attention": attention(), "cross_entropy": cross_entropy()}, indent=2))


if __name__ == "__main__":
    main()
