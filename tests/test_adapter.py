"""The PEFT LoRA adapter format: what read_adapter refuses, foreign PEFT adapters read exactly,
and an adapter on a tied LM head."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.errors import InvalidInputError, NumericalError
from compressor.formats.adapter import Adapter, LowRankTerm, apply_adapter, read_adapter, save_adapter

from conftest import build_model

Q = "model.layers.0.self_attn.q_proj"  # (64, 64)
V = "model.layers.0.self_attn.v_proj"  # (32, 64)


def _factors(rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, out in ((Q, 64), (V, 32)):
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, 64, generator=g)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return tensors


def _write(folder, config: dict | None = None, tensors: dict[str, torch.Tensor] | None = None):
    """A PEFT LoRA folder: rank 2, alpha 4 on q_proj and v_proj of block 0, changed by ``config``
    and ``tensors`` (None as a value removes a key)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": False}
    merged = {k: v for k, v in {**base, **(config or {})}.items() if v is not None}
    weights = {k: v for k, v in {**_factors(), **(tensors or {})}.items() if v is not None}
    (folder / "adapter_config.json").write_text(json.dumps(merged), encoding="utf-8")
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


def test_the_base_folder_reads(tmp_path):
    """The folder every refusal below changes in one place is itself accepted, scale folded in."""
    adapter = read_adapter(_write(tmp_path / "a"))
    factors = _factors()
    assert set(adapter.terms) == {Q, V}
    assert torch.equal(adapter.terms[Q].a, factors[f"base_model.model.{Q}.lora_A.weight"])
    assert torch.allclose(adapter.terms[Q].b, 2 * factors[f"base_model.model.{Q}.lora_B.weight"])  # alpha/r = 4/2


def _nan_factor():
    a = _factors()[f"base_model.model.{V}.lora_A.weight"].clone()
    a[1, 3] = float("nan")
    return a


@pytest.mark.parametrize("config,tensors,error,match", [
    ({"peft_type": "IA3"}, None, InvalidInputError, r"only LoRA adapters can be applied \(peft_type 'IA3'\)"),
    ({"peft_type": None}, None, InvalidInputError, r"only LoRA adapters can be applied \(peft_type None\)"),
    ({"use_dora": True}, None, InvalidInputError, "DoRA adapters are not supported"),
    (None, {"base_model.model.lm_head.weight": torch.zeros(320, 64)}, InvalidInputError,
     r"tensors that are not LoRA factors: base_model\.model\.lm_head\.weight"),
    (None, {f"base_model.model.{V}.lora_B.weight": None}, InvalidInputError,
     r"missing factors or ranks unlike the config for model\.layers\.0\.self_attn\.v_proj$"),
    ({"r": 3}, None, InvalidInputError, r"missing factors or ranks unlike the config for .*q_proj.*v_proj"),
    ({"rank_pattern": {"v_proj": 3}}, None, InvalidInputError,
     r"missing factors or ranks unlike the config for model\.layers\.0\.self_attn\.v_proj$"),
    (None, {f"base_model.model.{V}.lora_A.weight": _nan_factor()}, NumericalError,
     r"base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight hold NaN or Inf"),
    (None, {f"base_model.model.{V}.lora_A.other.weight": torch.zeros(2, 64),
            f"base_model.model.{V}.lora_B.other.weight": torch.zeros(32, 2)}, InvalidInputError,
     r"holds several adapters \(\(unnamed\), \.other\); save one"),
    ({"rank_pattern": {"q_proj[": 3}}, None, InvalidInputError, r"adapter pattern 'q_proj\[' is not a valid regular expression"),
    ({"alpha_pattern": {"(v_proj": 3}}, None, InvalidInputError, r"adapter pattern '\(v_proj' is not a valid regular expression"),
], ids=["peft-type", "no-peft-type", "dora", "not-a-factor", "missing-B", "rank-vs-r", "rank-vs-pattern", "nan",
        "two-adapters", "bad-rank-regex", "bad-alpha-regex"])
def test_read_adapter_refuses(tmp_path, config, tensors, error, match):
    with pytest.raises(error, match=match):
        read_adapter(_write(tmp_path / "a", config, tensors))


def test_read_adapter_refuses_missing_or_unreadable_files(tmp_path):
    with pytest.raises(InvalidInputError, match="adapter folder not found: .*nowhere"):
        read_adapter(tmp_path / "nowhere")
    folder = _write(tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(InvalidInputError, match="has no adapter_config.json: not a PEFT adapter folder"):
        read_adapter(folder)
    (folder / "adapter_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="cannot read .*adapter_config.json"):
        read_adapter(folder)
    folder = _write(tmp_path / "b")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="has no adapter_model.safetensors"):
        read_adapter(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InvalidInputError, match="cannot read .*adapter_model.safetensors"):
        read_adapter(folder)


def test_read_adapter_refuses_a_config_that_is_not_an_object(tmp_path):
    folder = _write(tmp_path / "a")
    (folder / "adapter_config.json").write_text("[]", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="not a JSON object"):
        read_adapter(folder)


# ---------------------------------------------------------------- foreign PEFT adapters


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(seed))


def _randomized(peft_model) -> None:
    """LoRA factors away from PEFT's initialization (B = 0 would make every adapter a no-op)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("config,ranks", [
    ({"r": 4, "lora_alpha": 16}, {}),
    ({"r": 4, "lora_alpha": 6, "use_rslora": True}, {}),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6},
      "alpha_pattern": {"down_proj": 3, r"layers\.0\.self_attn\.v_proj": 5}},
     {"model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.q_proj": 6, "model.layers.0.self_attn.q_proj": 4}),
    ({"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
     {"model.layers.1.mlp.down_proj": 2}),
], ids=["alpha", "rslora", "patterns", "rslora-patterns"])
def test_foreign_peft_adapter_gives_peft_logits(tmp_path, config, ranks):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, **config)
    theirs = peft.get_peft_model(build_model("llama"), lora).eval()
    _randomized(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    adapter = read_adapter(tmp_path / "adapter")
    assert len(adapter.terms) == 3 * 2  # three modules in each of two blocks
    for name, rank in ranks.items():
        assert adapter.terms[name].rank == rank
    ours = build_model("llama")
    base_logits = ours(input_ids=_ids()).logits.detach()
    apply_adapter(ours, adapter)
    with torch.no_grad():
        want, got = theirs(input_ids=_ids()).logits, ours(input_ids=_ids()).logits
    assert (want - base_logits).abs().max() > 1e-2  # the adapter matters, so a wrong scale shows
    assert torch.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- tied LM head


def _tied_llama():
    import transformers

    from conftest import _llama_config

    config = _llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_adapter_on_a_tied_lm_head_leaves_the_embeddings(tmp_path):
    peft = pytest.importorskip("peft")
    g = torch.Generator().manual_seed(2)
    term = LowRankTerm(torch.randn(320, 3, generator=g) * 0.3, torch.randn(3, 64, generator=g) * 0.3)
    save_adapter(tmp_path / "adapter", {"lm_head": term}, base_model=None)
    ours = _tied_llama()
    embeddings = ours.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        base = ours(input_ids=_ids()).logits
    apply_adapter(ours, read_adapter(tmp_path / "adapter"))
    assert torch.equal(ours.get_input_embeddings().weight, embeddings)
    assert ours.lm_head.weight is ours.get_input_embeddings().weight  # still tied
    theirs = peft.PeftModel.from_pretrained(_tied_llama(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got, want = ours(input_ids=_ids()).logits, theirs(input_ids=_ids()).logits
    assert (want - base).abs().max() > 1e-2
    assert torch.allclose(got, want, atol=1e-5)


def test_apply_adapter_merges_an_untied_lm_head(tmp_path):
    """The control: without tying, the term is merged into the weight (no hook left behind)."""
    g = torch.Generator().manual_seed(2)
    term = LowRankTerm(torch.randn(320, 3, generator=g), torch.randn(3, 64, generator=g))
    model = build_model("llama")
    before = model.lm_head.weight.detach().clone()
    apply_adapter(model, Adapter({"lm_head": term}, None))
    assert torch.allclose(model.lm_head.weight, before + term.b @ term.a, atol=1e-5)
    assert not model.lm_head._forward_hooks
