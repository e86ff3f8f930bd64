"""Layer-streamed runs: a skeleton on the meta device whose blocks are read from the checkpoint one
at a time must give the same ranks, factors and spectra as the model loaded whole."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from compressor import api
from compressor.loading import load_model
from compressor.options import CalibrationOptions, FactorizeOptions
from compressor.pipeline import head_modules
from compressor.streaming import is_streamed, weights_of
from compressor.targets import find_blocks

KINDS = ["llama", "qwen2", "gpt2", "bert"]


@pytest.fixture(autouse=True)
def _stream_every_model(monkeypatch):
    """The tiny models are far below the size from which models stream by default."""
    monkeypatch.setenv("COMPRESS_STREAM_MIN_BYTES", "0")


def test_models_below_the_streaming_size_load_whole(tiny_llama, monkeypatch):
    monkeypatch.delenv("COMPRESS_STREAM_MIN_BYTES")
    assert not load_model(str(tiny_llama.path), streamed_to=torch.device("cpu")).streamed
    monkeypatch.setenv("COMPRESS_STREAM_MIN_BYTES", str(10**9))
    assert not load_model(str(tiny_llama.path), streamed_to=torch.device("cpu")).streamed
    monkeypatch.setenv("COMPRESS_STREAM_MIN_BYTES", "1000")
    assert load_model(str(tiny_llama.path), streamed_to=torch.device("cpu")).streamed


def _calibration(text_file) -> CalibrationOptions:
    return CalibrationOptions(str(text_file), samples=6, seq_len=24)


def _tensors(folder) -> dict[str, torch.Tensor]:
    # transformers 5.0 writes a BERT loaded whole under the legacy LayerNorm names it was read from
    # (gamma, beta); both name sets load the same
    def canonical(key: str) -> str:
        return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")

    return {canonical(k): v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same_checkpoint(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_streamed_model_is_a_skeleton_with_real_buffers(tiny_llama):
    loaded = load_model(str(tiny_llama.path), streamed_to=torch.device("cpu"))
    assert loaded.streamed and is_streamed(loaded.model)
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    assert all(b.device.type == "cpu" for b in loaded.model.buffers())
    whole = load_model(str(tiny_llama.path))
    assert not whole.streamed
    # a block read from the files equals the block loaded whole, and goes back to meta afterwards
    _, blocks = find_blocks(loaded.model)
    _, whole_blocks = find_blocks(whole.model)
    with weights_of(loaded.model).holding(blocks[1]):
        for (name, p), (_, q) in zip(blocks[1].named_parameters(), whole_blocks[1].named_parameters()):
            assert torch.equal(p, q), name
    assert all(p.device.type == "meta" for p in blocks[1].parameters())


def test_tied_weights_are_read_once_and_shared(tiny_gpt2):
    loaded = load_model(str(tiny_gpt2.path), streamed_to=torch.device("cpu"))
    assert loaded.streamed
    model = loaded.model
    with weights_of(model).holding(model.transformer.wte):
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.lm_head.weight.device.type == "cpu"
    assert model.lm_head.weight.device.type == "meta"


def test_a_tied_embedding_is_held_as_the_output_layer_it_also_is(tiny_gpt2, tmp_path, tokenizer):
    """Under bfloat16 autocast the head's weight stays in the checkpoint's bfloat16 even where the
    input embedding, which is not a linear layer, comes first; held for the embedding alone it is
    read in the model's float32."""
    folder = tmp_path / "bf16"
    tiny_gpt2.model.to(torch.bfloat16).save_pretrained(folder)
    tiny_gpt2.model.to(torch.float32)
    tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), streamed_to=torch.device("cpu"))
    assert loaded.streamed
    model = loaded.model
    with weights_of(model).holding(head_modules(model), torch.bfloat16):
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.lm_head.weight.dtype == torch.bfloat16
    with weights_of(model).holding(model.transformer.wte, torch.bfloat16):
        assert model.transformer.wte.weight.dtype == torch.bfloat16  # tied: the output layer's dtype
    with weights_of(model).holding(model.transformer.wpe, torch.bfloat16):
        assert model.transformer.wpe.weight.dtype == torch.float32  # not a linear layer's weight


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_and_in_memory_factorize_write_the_same_checkpoint(request, kind, text_file, tmp_path):
    tiny = request.getfixturevalue(f"tiny_{kind}")
    options = FactorizeOptions(0.6)  # the default metric (fisher; BERT falls back to whiten)
    assert load_model(str(tiny.path), streamed_to=torch.device("cpu")).streamed
    streamed = api.factorize(str(tiny.path), options, _calibration(text_file), output=tmp_path / "s", device="cpu")
    whole = api.factorize(load_model(str(tiny.path)), options, _calibration(text_file), output=tmp_path / "w", device="cpu")
    assert streamed.outcome.plan.ranks == whole.outcome.plan.ranks
    assert streamed.outcome.plan.options == whole.outcome.plan.options  # the same fallback, if any
    _assert_same_checkpoint(tmp_path / "s", tmp_path / "w")


def test_streamed_sequential_factorize_matches_in_memory(tiny_llama, text_file, tmp_path):
    options = FactorizeOptions(0.5, sequential=True)
    streamed = api.factorize(str(tiny_llama.sharded_path), options, _calibration(text_file), output=tmp_path / "s")
    whole = api.factorize(load_model(str(tiny_llama.sharded_path)), options, _calibration(text_file), output=tmp_path / "w")
    assert streamed.outcome.plan.ranks == whole.outcome.plan.ranks
    _assert_same_checkpoint(tmp_path / "s", tmp_path / "w")


def test_streamed_analyze_matches_in_memory(tiny_qwen2, text_file):
    streamed = api.analyze(str(tiny_qwen2.path), _calibration(text_file))
    whole = api.analyze(load_model(str(tiny_qwen2.path)), _calibration(text_file))
    for a, b in zip(streamed.analysis.modules, whole.analysis.modules):
        assert a.name == b.name
        torch.testing.assert_close(a.whitened.singular_values, b.whitened.singular_values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.plain.singular_values, b.plain.singular_values, rtol=1e-6, atol=1e-7)


def test_a_streamed_run_holds_one_block_at_a_time(tiny_llama, text_file, tmp_path, monkeypatch):
    """While any block runs, every other block's weights are on the meta device: memory does not grow with depth."""
    from compressor import factorize as factorize_module

    seen: list[int] = []
    real = factorize_module.factorize_model

    def watching(model, *args, **kwargs):
        _, blocks = find_blocks(model)

        def check(index):
            def hook(module, args, kwargs):
                others = [i for i, b in enumerate(blocks) if i != index and any(p.device.type != "meta" for p in b.parameters()
                                                                                  if not p.shape or p.numel() > 0)]
                # factored modules made earlier keep their factors (they are the output), nothing else
                dense_others = [i for i in others if any(p.device.type != "meta" for n, p in blocks[i].named_parameters()
                                                         if not n.endswith(("weight_a", "weight_b", "bias")))]
                assert not dense_others, f"block {index} runs while blocks {dense_others} are loaded"
                hidden = args[0] if args else kwargs["hidden_states"]
                if torch.is_inference_mode_enabled() and index == 1:  # the layer loop (not capture, not the Fisher pass)
                    files.append(hidden.untyped_storage().filename)
                seen.append(index)

            return hook

        handles = [b.register_forward_pre_hook(check(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            return real(model, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    files: list[str | None] = []
    monkeypatch.setattr(factorize_module, "factorize_model", watching)
    monkeypatch.setattr("compressor.factorize.factorize_model", watching)
    api.factorize(str(tiny_llama.path), FactorizeOptions(0.5, sequential=True), _calibration(text_file), output=tmp_path / "o")
    assert set(seen) == {0, 1}
    # the layer loop's hidden states live in files of the scratch folder, not in anonymous memory
    assert files and all(f is not None and "spill" in f for f in files), files
    assert not list(tmp_path.glob("*spill*"))  # the scratch folder is gone afterwards


def test_a_checkpoint_that_does_not_map_onto_the_model_loads_whole(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_llama.path, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    from compressor.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="extra"):  # the whole-model loader's strict report
        load_model(str(folder), streamed_to=torch.device("cpu"))


def test_nan_in_a_streamed_weight_is_refused_when_read(nan_llama_dir, text_file, tmp_path):
    from compressor.errors import NumericalError

    with pytest.raises(NumericalError, match="NaN or Inf"):
        api.factorize(str(nan_llama_dir), FactorizeOptions(0.5), _calibration(text_file), output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_streamed_perplexity_matches_in_memory(request, kind, small_text_file, monkeypatch):
    import compressor.evaluate as evaluate

    tiny = request.getfixturevalue(f"tiny_{kind}")
    groups = []
    real = evaluate._streamed_nll
    monkeypatch.setattr(evaluate, "_streamed_nll", lambda *a: groups.append(a) or real(*a))
    monkeypatch.setattr(evaluate, "STREAMED_GROUP_BYTES", 1)  # several groups of windows
    streamed = api.evaluate(str(tiny.path), small_text_file, seq_len=16, batch_size=2, device="cpu")
    assert len(groups) == 1  # the streamed path ran
    whole = api.evaluate(load_model(str(tiny.path)), small_text_file, seq_len=16, batch_size=2, device="cpu")
    assert streamed.windows == whole.windows > 2
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-5)


@pytest.mark.gpu
def test_streamed_on_cuda_matches_in_memory_on_cuda(tiny_qwen2, text_file, tmp_path):
    options = FactorizeOptions(0.5, sequential=True, calib_dtype="float32")
    streamed = api.factorize(str(tiny_qwen2.path), options, _calibration(text_file), output=tmp_path / "s", device="cuda")
    whole = api.factorize(load_model(str(tiny_qwen2.path)), options, _calibration(text_file), output=tmp_path / "w", device="cuda")
    assert streamed.outcome.plan.ranks == whole.outcome.plan.ranks
    _assert_same_checkpoint(tmp_path / "s", tmp_path / "w")
    a = api.evaluate(str(tmp_path / "s"), text_file, seq_len=16, max_windows=4, device="cuda")
    b = api.evaluate(str(tiny_qwen2.path), text_file, seq_len=16, max_windows=4, device="cuda")
    c = api.evaluate(str(tiny_qwen2.path), text_file, seq_len=16, max_windows=4, device="cpu")
    assert a.perplexity > 0 and b.perplexity == pytest.approx(c.perplexity, rel=1e-3)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])  # q/k/v biases; Conv1D
def test_a_bfloat16_checkpoint_streamed_under_bfloat16_autocast_matches_in_memory(request, kind, text_file, tmp_path, tokenizer):
    """Its linear layers stay in bfloat16 while held (the values autocast multiplies anyway); the
    result, written in float32, equals the float32 model loaded whole."""
    tiny = request.getfixturevalue(f"tiny_{kind}")
    folder = tmp_path / "bf16"
    tiny.model.to(torch.bfloat16).save_pretrained(folder)
    tiny.model.to(torch.float32)
    tokenizer.save_pretrained(folder)
    options = FactorizeOptions(0.5, sequential=True, calib_dtype="bfloat16")
    seen = []
    loaded = load_model(str(folder), streamed_to=torch.device("cpu"))
    assert loaded.streamed
    _, blocks = find_blocks(loaded.model)

    def spy(module, args, kwargs):
        seen.extend(p.dtype for n, p in module.named_parameters() if n.endswith(("proj.weight", "c_fc.weight", "c_attn.weight")))

    handle = blocks[0].register_forward_pre_hook(spy, with_kwargs=True)
    streamed = api.factorize(loaded, options, _calibration(text_file), output=tmp_path / "s")
    handle.remove()
    assert torch.bfloat16 in seen  # the block really was held in bfloat16
    whole = api.factorize(load_model(str(folder)), options, _calibration(text_file), output=tmp_path / "w")
    assert streamed.outcome.plan.ranks == whole.outcome.plan.ranks
    _assert_same_checkpoint(tmp_path / "s", tmp_path / "w")
    assert all(t.dtype == torch.float32 for t in _tensors(tmp_path / "s").values())
