"""A small real factorization of SmolLM2-135M: it stays a working language model."""

import copy
import math

import pytest
import torch

from compressor.options import CalibrationOptions
from compressor import api
from compressor.calibration.sources import tokenize_text
from compressor.evaluate import perplexity
from compressor.factorize import FactorizeOptions, factorize_model
from compressor.targets import select_targets

from quality_bounds import FACTORIZED_0_8_PPL, FACTORIZED_0_8_PPL_REL, assert_near


@pytest.mark.real
def test_smollm2_factorized_at_0_8_stays_good(smollm2, shared_data):
    model = copy.deepcopy(smollm2.model)
    loaded = copy.copy(smollm2)
    loaded.model = model
    calibration = api.calibrate(loaded, CalibrationOptions(str(shared_data / "wikitext2-valid.txt"), samples=8, seq_len=256, seed=0))
    targets = select_targets(model)
    assert len(targets) == 210
    outcome = factorize_model(model, targets, FactorizeOptions(0.8, method="fisher", alloc="global", sequential=False), calibration)
    assert 0.795 <= outcome.plan.kept_fraction <= 0.8
    ids = tokenize_text(smollm2.tokenizer, (shared_data / "wikitext2-raw-test.txt").read_text(encoding="utf-8"))
    with torch.inference_mode():
        result = perplexity(model, ids, seq_len=512, max_windows=2, batch_size=2)
    assert math.isfinite(result.perplexity)
    assert_near(result.perplexity, FACTORIZED_0_8_PPL, FACTORIZED_0_8_PPL_REL, "SmolLM2 factorized at 0.8, perplexity 2 × 512")
