"""compressor.targets: which modules are targets, and their weights as (out, in)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.api import targets_of
from compressor.errors import UsageError
from compressor.loading import LoadedModel
from compressor.pipeline import iterate_blocks
from compressor.targets import Target, find_blocks, is_linear, select_targets

from conftest import HIDDEN, LAYERS, VOCAB

LLAMA_TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
GPT2_TYPES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
BERT_TYPES = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


def _check_default(targets: list[Target], prefix: str, types: list[str]):
    expected = [f"{prefix}.{i}.{t}" for i in range(LAYERS) for t in types]
    assert sorted(t.name for t in targets) == sorted(expected)
    for t in targets:
        assert t.block_index == int(t.name[len(prefix) + 1 :].split(".")[0])
        assert t.layer_type in types
        assert t.name.endswith(t.layer_type)


def test_llama_default_targets(tiny_llama):
    model = tiny_llama.model
    targets = select_targets(model)
    assert len(targets) == 7 * LAYERS
    _check_default(targets, "model.layers", LLAMA_TYPES)
    assert all(t.kind == "linear" for t in targets)
    names = {t.name for t in targets}
    assert "lm_head" not in names
    assert not any("embed" in n for n in names)
    shapes = {t.layer_type: t.shape for t in targets}
    assert shapes["self_attn.q_proj"] == (HIDDEN, HIDDEN)
    assert shapes["self_attn.k_proj"] == (HIDDEN // 2, HIDDEN)  # GQA: 2 of 4 heads
    assert shapes["mlp.up_proj"] == (2 * HIDDEN, HIDDEN)
    assert shapes["mlp.down_proj"] == (HIDDEN, 2 * HIDDEN)
    for t in targets:
        assert t.params == t.shape[0] * t.shape[1]
        assert t.weight().shape == t.shape


def test_find_blocks(tiny_llama, tiny_gpt2, tiny_bert):
    assert find_blocks(tiny_llama.model)[0] == "model.layers"
    assert find_blocks(tiny_gpt2.model)[0] == "transformer.h"
    assert find_blocks(tiny_bert.model)[0] == "encoder.layer"
    with pytest.raises(ValueError):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_qwen2_targets_have_bias(tiny_qwen2):
    targets = select_targets(tiny_qwen2.model)
    assert len(targets) == 7 * LAYERS
    _check_default(targets, "model.layers", LLAMA_TYPES)
    with_bias = {t.layer_type for t in targets if t.module.bias is not None}
    assert with_bias == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}


def test_bert_targets_skip_pooler(tiny_bert):
    targets = select_targets(tiny_bert.model)
    assert len(targets) == 6 * LAYERS
    _check_default(targets, "encoder.layer", BERT_TYPES)
    assert not any("pooler" in t.name for t in targets)
    # the pooler is a Linear outside the blocks: an include glob reaches it
    pooler = select_targets(tiny_bert.model, include=["pooler.*"])
    assert [(t.name, t.block_index) for t in pooler] == [("pooler.dense", None)]
    assert pooler[0].layer_type == "pooler.dense"


def test_gpt2_conv1d_orientation(tiny_gpt2):
    targets = select_targets(tiny_gpt2.model)
    assert len(targets) == 4 * LAYERS
    _check_default(targets, "transformer.h", GPT2_TYPES)
    assert all(t.kind == "conv1d" for t in targets)
    shapes = {t.layer_type: t.shape for t in targets}
    assert shapes == {
        "attn.c_attn": (3 * HIDDEN, HIDDEN),
        "attn.c_proj": (HIDDEN, HIDDEN),
        "mlp.c_fc": (4 * HIDDEN, HIDDEN),
        "mlp.c_proj": (HIDDEN, 4 * HIDDEN),
    }
    g = torch.Generator().manual_seed(0)
    for t in targets:
        w = t.weight()
        assert w.shape == t.shape
        x = torch.randn(3, 5, t.shape[1], generator=g)
        with torch.no_grad():
            expected = t.module(x)
        torch.testing.assert_close(F.linear(x, w, t.module.bias), expected, rtol=1e-5, atol=1e-5)


def test_linear_weight_is_the_parameter(tiny_llama):
    t = select_targets(tiny_llama.model)[0]
    assert t.weight().data_ptr() == t.module.weight.data_ptr()
    x = torch.randn(4, t.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, t.weight()), t.module(x), rtol=0, atol=0)


def test_is_linear(tiny_gpt2):
    from transformers.pytorch_utils import Conv1D

    assert is_linear(nn.Linear(2, 3))
    assert is_linear(Conv1D(3, 2))
    assert not is_linear(nn.Embedding(4, 2))
    assert not is_linear(nn.LayerNorm(2))


def test_include_lm_head(tiny_llama):
    targets = select_targets(tiny_llama.model, include=["*lm_head"])
    assert [(t.name, t.block_index, t.kind) for t in targets] == [("lm_head", None, "linear")]
    assert targets[0].shape == (VOCAB, HIDDEN)
    assert targets[0].layer_type == "lm_head"


def test_include_replaces_default(tiny_llama):
    targets = select_targets(tiny_llama.model, include=["*.q_proj", "*lm_head"])
    assert sorted(t.name for t in targets) == sorted(
        ["lm_head"] + [f"model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]
    )


def test_exclude_mlp(tiny_llama):
    targets = select_targets(tiny_llama.model, exclude=["*.mlp.*"])
    assert len(targets) == 4 * LAYERS
    assert all(t.layer_type.startswith("self_attn.") for t in targets)


def test_include_then_exclude(tiny_gpt2):
    targets = select_targets(tiny_gpt2.model, include=["*lm_head", "transformer.h.*"], exclude=["*.1.*"])
    names = sorted(t.name for t in targets)
    assert names == sorted(["lm_head"] + [f"transformer.h.0.{t}" for t in GPT2_TYPES])


def test_no_match_is_usage_error(tiny_llama):
    loaded = LoadedModel(tiny_llama.model, tiny_llama.tokenizer, "tiny", None)
    with pytest.raises(UsageError, match="no target"):
        targets_of(loaded, include=["*nothing_matches*"])
    with pytest.raises(UsageError):
        targets_of(loaded, exclude=["*"])


def test_layer_loop_rejects_targets_outside_blocks(tiny_llama):
    head = select_targets(tiny_llama.model, include=["lm_head"])
    with pytest.raises(ValueError, match="outside"):
        list(iterate_blocks(tiny_llama.model, [torch.zeros(1, 4, dtype=torch.long)], head))
