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


def _spy_releases(monkeypatch, module) -> list[set[int]]:
    """Record, per call of ``module.release``, the storages it was given (then really release)."""
    calls: list[set[int]] = []

    def spy(tensors):
        tensors = list(tensors)
        calls.append({t.untyped_storage().data_ptr() for t in tensors})
        return release(tensors)

    monkeypatch.setattr(module, "release", spy)
    return calls


def _storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_layer_loop_releases_each_block_behind_it_and_the_model_is_unchanged(tiny_llama, monkeypatch):
    import compressor.streaming as pipeline  # a model loaded whole: its store releases the pages

    model = load_model(str(tiny_llama.path)).model
    _, blocks = find_blocks(model)
    ids = torch.randint(0, 300, (2, 16))
    with torch.inference_mode():
        before = model(ids).logits
    assert all(resident_bytes(b.parameters()) > 0 for b in blocks), "expected memory-mapped weights"
    calls = _spy_releases(monkeypatch, pipeline)
    seen = []
    for step in iterate_blocks(model, [ids], select_targets(model)):
        seen.append(len(calls))  # releases made before this block's step
        step.collect_grams(block_final=True)
    released = [i for i, b in enumerate(blocks) if any(_storages(b) <= c for c in calls)]
    assert released == list(range(len(blocks)))
    assert not any(_storages(blocks[1]) <= c for c in calls[: seen[1]])  # not before its own step
    # Memory-mapped pages come back when read (the kernel may also map neighbours of a read
    # page, so how many stay resident is not asserted here; test_file_pages_* checks that).
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_fisher_pass_releases_every_block(tiny_llama, monkeypatch):
    import compressor.streaming as sensitivity  # a model loaded whole: its store releases the pages

    model = load_model(str(tiny_llama.path)).model
    _, blocks = find_blocks(model)
    calls = _spy_releases(monkeypatch, sensitivity)
    output_fisher(model, select_targets(model), [torch.randint(0, 300, (1, 16)) for _ in range(2)])
    for b in blocks:  # after its forward and after its backward (both windows in one group)
        assert sum(_storages(b) <= c for c in calls) >= 2


def test_spill_leaves_tensors_off_the_host_alone(tmp_path):
    from compressor.residency import Spill

    t = torch.empty(3, 4, device="meta")
    assert Spill(tmp_path).hold(t) is t
    assert list(tmp_path.iterdir()) == []


def test_a_view_releases_its_own_pages_only(tmp_path):
    values = _values()
    t = _mapped(tmp_path, values)
    t.sum()
    half = t.numel() // 2  # PAGES / 2 whole pages
    released = release([t[:half]])
    assert released == half * 4
    np.testing.assert_array_equal(t.numpy(), values)


def test_kernel_caches_are_bounded_unless_the_environment_says_otherwise(monkeypatch):
    from compressor.residency import KERNEL_CACHE_CAPACITY, bound_kernel_caches

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    bound_kernel_caches()
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


def test_the_mmap_threshold_is_fixed_unless_the_environment_sets_it():
    """In a child process: mallopt would change this test process's allocator for the tests after it."""
    import os
    import platform
    import subprocess
    import sys

    code = "from compressor.residency import fix_mmap_threshold; print(fix_mmap_threshold())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    user = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"},
                          capture_output=True, text=True, check=True)
    assert user.stdout.strip() == "False"  # the user's setting stands
    fixed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert fixed.stdout.strip() == ("True" if glibc else "False")
