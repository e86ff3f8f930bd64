"""Releasing the pages behind memory-mapped weights: only where nothing is lost."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from compressor.loading import load_model
from compressor.pipeline import iterate_blocks
from compressor.residency import release, resident_bytes
from compressor.sensitivity import output_fisher
from compressor.targets import find_blocks, select_targets

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or resident_bytes([torch.zeros(1)]) is None,
    reason="needs Linux with a readable /proc/self/pagemap",
)

PAGES = 64


def _mapped(tmp_path, values: np.ndarray) -> torch.Tensor:
    path = tmp_path / "weights.bin"
    path.write_bytes(values.tobytes())
    return torch.from_file(str(path), shared=False, size=values.size, dtype=torch.float32)


def _values() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(PAGES * 1024).astype(np.float32)  # PAGES pages of 4 KiB


def test_file_pages_are_dropped_and_read_back_unchanged(tmp_path):
    values = _values()
    t = _mapped(tmp_path, values)
    assert float(t.sum()) == pytest.approx(float(values.sum()), rel=1e-5)  # every page read
    assert resident_bytes([t]) >= t.nbytes
    assert release([t]) >= t.nbytes
    assert resident_bytes([t]) == 0
    np.testing.assert_array_equal(t.numpy(), values)


def test_anonymous_memory_is_never_dropped():
    t = torch.arange(PAGES * 1024, dtype=torch.float32)
    assert release([t]) == 0
    assert resident_bytes([t]) >= t.nbytes
    torch.testing.assert_close(t, torch.arange(PAGES * 1024, dtype=torch.float32))


def test_a_written_page_keeps_the_whole_range_resident(tmp_path):
    values = _values()
    t = _mapped(tmp_path, values)
    t.sum()
    t[5000] = 123.0  # a private copy of one page: dropping it would bring back the file's value
    assert release([t]) == 0
    assert float(t[5000]) == 123.0
    np.testing.assert_array_equal(t.numpy()[:4096], values[:4096])


def test_layer_loop_holds_no_block_after_a_pass_and_the_model_is_unchanged(tiny_llama, text_file):
    model = load_model(str(tiny_llama.path)).model
    _, blocks = find_blocks(model)
    ids = torch.randint(0, 300, (2, 16))
    with torch.inference_mode():
        before = model(ids).logits
    sizes = [sum(p.nbytes for p in b.parameters()) for b in blocks]
    assert all(resident_bytes(b.parameters()) >= size for b, size in zip(blocks, sizes)), "expected memory-mapped weights"
    for step in iterate_blocks(model, [ids], select_targets(model)):
        step.collect_grams(block_final=True)
    # Reading a mapped page also maps its cached neighbours (the kernel's fault-around, up to
    # 64 KiB), so the start of the next block may bring back the end of the one released before it.
    fault_around = 64 * 1024 + 2 * 4096
    assert all(size > fault_around for size in sizes)
    assert all(resident_bytes(b.parameters()) <= fault_around for b in blocks)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_fisher_pass_ends_holding_no_block(tiny_llama):
    model = load_model(str(tiny_llama.path)).model
    _, blocks = find_blocks(model)
    output_fisher(model, select_targets(model), [torch.randint(0, 300, (1, 16)) for _ in range(2)])
    assert all(resident_bytes(b.parameters()) <= 64 * 1024 + 2 * 4096 for b in blocks)
