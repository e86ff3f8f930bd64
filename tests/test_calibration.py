"""compressor.calibration.sources: --calib SPEC → [N, L] token ids, recorded with its origin."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.options import CalibrationOptions
from compressor.calibration.sources import load_calibration, tokenize_text
from compressor.errors import InvalidInputError, UsageError

from conftest import BOS_ID, VOCAB, make_text


def _window_indices(ids: torch.Tensor, calib: torch.Tensor, seq_len: int) -> list[int]:
    """For each calibration row, the index k such that it equals ids[k*L:(k+1)*L]."""
    available = ids.numel() // seq_len
    windows = ids[: available * seq_len].view(available, seq_len)
    found = []
    for row in calib:
        matches = (windows == row).all(dim=1).nonzero().flatten().tolist()
        assert matches, "a calibration row is not an aligned window of the tokenized text"
        found.append(matches[0])
    return found


def test_txt_windows_are_aligned_slices(tokenizer, text_file):
    calib = load_calibration(CalibrationOptions(str(text_file), samples=6, seq_len=16, seed=0), tokenizer)
    ids = tokenize_text(tokenizer, text_file.read_text(encoding="utf-8"))
    assert calib.input_ids.shape == (6, 16)
    assert calib.input_ids.dtype == torch.long
    found = _window_indices(ids, calib.input_ids, 16)
    assert len(set(found)) == 6  # distinct windows: no overlap
    assert found == sorted(found)
    # not simply the first windows
    assert found != list(range(6))


def test_txt_seeded(tokenizer, text_file):
    a = load_calibration(CalibrationOptions(str(text_file), samples=4, seq_len=16, seed=0), tokenizer)
    b = load_calibration(CalibrationOptions(str(text_file), samples=4, seq_len=16, seed=0), tokenizer)
    c = load_calibration(CalibrationOptions(str(text_file), samples=4, seq_len=16, seed=1), tokenizer)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_info_records_origin(tokenizer, text_file):
    calib = load_calibration(CalibrationOptions(str(text_file), samples=3, seq_len=20, seed=5), tokenizer)
    info = calib.info.to_dict()
    assert info["spec"] == str(text_file)
    assert info["samples"] == 3
    assert info["seq_len"] == 20
    assert info["seed"] == 5
    assert info["tokens"] == 60
    json.dumps(info)  # serializable as it is


def test_batches(tokenizer, text_file):
    calib = load_calibration(CalibrationOptions(str(text_file), samples=5, seq_len=16, seed=0), tokenizer)
    batches = calib.batches(2)
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat(batches), calib.input_ids)


def test_jsonl(tokenizer, tmp_path):
    texts = [make_text(200, seed=s) for s in range(3)]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")  # blank line skipped
    calib = load_calibration(CalibrationOptions(str(path), samples=4, seq_len=16, seed=0), tokenizer)
    ids = tokenize_text(tokenizer, "\n\n".join(texts))
    assert calib.input_ids.shape == (4, 16)
    _window_indices(ids, calib.input_ids, 16)


def test_jsonl_missing_text_field(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine text here"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(InvalidInputError, match=r":2:"):
        load_calibration(CalibrationOptions(str(path), samples=1, seq_len=2), tokenizer)


def test_jsonl_not_json(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(InvalidInputError, match="JSON"):
        load_calibration(CalibrationOptions(str(path), samples=1, seq_len=2), tokenizer)


def test_jsonl_text_not_string(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": 42}\n')
    with pytest.raises(InvalidInputError):
        load_calibration(CalibrationOptions(str(path), samples=1, seq_len=2), tokenizer)


def test_missing_file(tokenizer, tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        load_calibration(CalibrationOptions(str(tmp_path / "nope.txt"), samples=1, seq_len=8), tokenizer)


def test_unknown_suffix(tokenizer, tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("some,text\n" * 100)
    with pytest.raises(UsageError):
        load_calibration(CalibrationOptions(str(path), samples=1, seq_len=8), tokenizer)


def test_unreadable_file(tokenizer, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 " * 200)  # not UTF-8
    with pytest.raises(InvalidInputError):
        load_calibration(CalibrationOptions(str(path), samples=1, seq_len=8), tokenizer)


def test_empty_file(tokenizer, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(InvalidInputError, match="empty"):
        load_calibration(CalibrationOptions(str(path), samples=1, seq_len=8), tokenizer)


def test_too_few_tokens(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("The model was built.")
    n = len(tokenize_text(tokenizer, path.read_text()))
    # exactly enough for one window of n tokens, not for two
    assert load_calibration(CalibrationOptions(str(path), samples=1, seq_len=n), tokenizer).input_ids.shape == (1, n)
    with pytest.raises(InvalidInputError, match="fewer than"):
        load_calibration(CalibrationOptions(str(path), samples=2, seq_len=n), tokenizer)
    with pytest.raises(InvalidInputError):
        load_calibration(CalibrationOptions(str(path), samples=1, seq_len=n + 1), tokenizer)


@pytest.mark.parametrize("samples,seq_len", [(0, 16), (4, 1), (-1, 16)])
def test_bad_sizes(tokenizer, text_file, samples, seq_len):
    with pytest.raises(UsageError):
        CalibrationOptions("self", samples=samples, seq_len=seq_len)
    with pytest.raises(UsageError):
        load_calibration(CalibrationOptions(str(text_file), samples=samples, seq_len=seq_len), tokenizer)


def test_self_needs_model(tokenizer):
    with pytest.raises(UsageError):
        load_calibration(CalibrationOptions("self", samples=2, seq_len=8), tokenizer, None)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_self_generates_from_bos(tiny_llama, compute_dtype):
    rng_before = torch.get_rng_state()
    kwargs = {"compute_dtype": compute_dtype}
    a = load_calibration(CalibrationOptions("self", samples=3, seq_len=12, seed=0), tiny_llama.tokenizer, tiny_llama.model, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert a.input_ids.shape == (3, 12)
    assert a.input_ids.dtype == torch.long
    assert (a.input_ids[:, 0] == BOS_ID).all()
    assert ((a.input_ids >= 0) & (a.input_ids < VOCAB)).all()
    # sampled, not a constant: a random tiny model spreads its probability over the vocabulary
    assert a.input_ids[:, 1:].unique().numel() > 5
    b = load_calibration(CalibrationOptions("self", samples=3, seq_len=12, seed=0), tiny_llama.tokenizer, tiny_llama.model, **kwargs)
    c = load_calibration(CalibrationOptions("self", samples=3, seq_len=12, seed=1), tiny_llama.tokenizer, tiny_llama.model, **kwargs)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    info = a.info.to_dict()
    assert (info["spec"], info["samples"], info["seq_len"], info["seed"], info["tokens"]) == ("self", 3, 12, 0, 36)
    assert info["note"]


def test_self_on_bert_uses_random_tokens(tiny_bert, caplog):
    with caplog.at_level("WARNING"):
        a = load_calibration(CalibrationOptions("self", samples=4, seq_len=10, seed=0), tiny_bert.tokenizer, tiny_bert.model)
    assert a.input_ids.shape == (4, 10)
    assert ((a.input_ids >= 0) & (a.input_ids < VOCAB)).all()
    assert "random" in a.info.note
    assert any("random" in r.getMessage() for r in caplog.records)
    b = load_calibration(CalibrationOptions("self", samples=4, seq_len=10, seed=0), tiny_bert.tokenizer, tiny_bert.model)
    c = load_calibration(CalibrationOptions("self", samples=4, seq_len=10, seed=2), tiny_bert.tokenizer, tiny_bert.model)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("spec", ["hf:", "hf:a:b:c:d"])
def test_bad_hf_spec(tokenizer, spec):
    with pytest.raises(UsageError):
        load_calibration(CalibrationOptions(spec, samples=1, seq_len=8), tokenizer)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_self_generation_releases_weights_only_where_autocast_holds_copies(tiny_llama, compute_dtype, monkeypatch):
    import compressor.calibration.sources as sources
    from compressor.loading import load_model

    model = load_model(str(tiny_llama.path)).model  # memory-mapped weights: dropped pages come back
    monkeypatch.setattr(sources, "GENERATION_BATCH", 2)
    expected = load_calibration(CalibrationOptions("self", samples=3, seq_len=12, seed=0), tiny_llama.tokenizer, model, compute_dtype=compute_dtype)
    released = []
    real_release = sources.release
    monkeypatch.setattr(sources, "release", lambda tensors: released.append(real_release(list(tensors))))
    got = load_calibration(CalibrationOptions("self", samples=3, seq_len=12, seed=0), tiny_llama.tokenizer, model, compute_dtype=compute_dtype)
    assert len(released) == (2 if compute_dtype is not None else 0)  # once per batch of sequences
    torch.testing.assert_close(got.input_ids, expected.input_ids, rtol=0, atol=0)
    for p in model.parameters():
        p.requires_grad_(False)  # autocast caches no copies: the weights are read at every step
    load_calibration(CalibrationOptions("self", samples=3, seq_len=12, seed=0), tiny_llama.tokenizer, model, compute_dtype=compute_dtype)
    assert len(released) == (2 if compute_dtype is not None else 0)
