"""What the real-model tests measure, in one place: each number measured on SmolLM2-135M (float32,
CPU, fixed seeds), with the tolerance its test allows.

The runs are deterministic on one machine (the same value to the last digit, run after run);
across machines, thread counts and BLAS builds change float sums in their last bits, which moves
a perplexity by far less than 0.5 %. A tolerance of a few percent therefore passes anywhere the
method is unchanged and fails when a change makes it worse by more than that: the old bounds (55
against 42.0, 20-40 against 27-28) would have let a factorization 30 % worse pass.

To re-measure after an intended change, run the real tests with ``-s`` (each prints its value):
``pytest -m real -s tests/test_real_models.py tests/test_factorize_real.py tests/test_compensate_real.py``
and update the numbers here together with the change that moved them.
"""

from __future__ import annotations

import pytest

# SmolLM2-135M as converted from its GGUF, wikitext2-raw-test, the first 2 windows of 512 tokens
# (api.evaluate, batch 2): measured 26.9871 (test_real_models.py::test_smollm2_perplexity).
SMOLLM2_PPL = 26.9871
SMOLLM2_PPL_REL = 0.01  # the unchanged model and protocol: only float noise

# factorize_model at kept fraction 0.8, method fisher, global allocation, one-shot, calibrated on
# 8 windows of 256 of wikitext2-valid (seed 0); perplexity as above (2 × 512): measured 41.9599
# (test_factorize_real.py).
FACTORIZED_0_8_PPL = 41.9599
FACTORIZED_0_8_PPL_REL = 0.03  # 3 %: rank allocation is discrete, a near-tie may flip elsewhere

# RTN 3-bit, asymmetric, group 128, then compensate at rank 16 (fisher, uniform, sequential) on
# 8 windows of 256 of wikitext2-valid (seed 0), 2 Fisher windows; perplexity on the first 8
# windows of 256 of wikitext2-raw-test (test_compensate_real.py). Measured: the base model
# 38.7739 (stored only, as the reference of the gap compensation closes), RTN w3 alone 209.1605,
# compensated 78.7341 (78.7233 with 1 thread instead of 2: 0.014 % apart).
W3_BASE_PPL = 38.7739
W3_RTN_PPL = 209.1605
W3_RTN_PPL_REL = 0.01  # rounding to a grid: no sums that could move with the machine
W3_COMPENSATED_PPL = 78.7341
W3_COMPENSATED_PPL_REL = 0.03


def assert_near(value: float, measured: float, rel: float, what: str) -> None:
    """``value`` within ``rel`` of ``measured``, both ways: worse fails (a regression), and so does
    much better (the protocol changed: the stored number no longer says what the test measures)."""
    print(f"{what}: {value:.4f} (stored {measured:.4f}, ±{rel:.0%})")
    assert value == pytest.approx(measured, rel=rel), (
        f"{what} is {value:.4f}, the stored measurement {measured:.4f} ±{rel:.0%}: "
        "a regression, or an intended change whose new number belongs in tests/quality_bounds.py"
    )
