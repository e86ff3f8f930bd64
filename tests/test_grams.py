"""GramCollector against XᵀX computed directly, and the layer loop against whole-model collection."""

from __future__ import annotations

import pytest
import torch

from compressor.analysis import analyze_grams
from compressor.calibration.grams import Gram, GramCollector
from compressor.pipeline import capture_block_inputs, collect_grams_whole_model, iterate_blocks
from compressor.targets import select_targets

from conftest import LAYERS, VOCAB


def _batches(n_batches: int = 2, batch: int = 3, length: int = 10, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, length), generator=g) for _ in range(n_batches)]


class _Capture:
    """Our own pre-hooks: keep every input each module sees, as float64 rows."""

    def __init__(self, modules: dict):
        self.rows = {name: [] for name in modules}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            self.rows[name].append(x.detach().reshape(-1, x.shape[-1]).to(torch.float64).clone())

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def xtx(self, name) -> tuple[torch.Tensor, int]:
        x = torch.cat(self.rows[name])
        return x.T @ x, x.shape[0]


def _assert_gram_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5):
    assert actual.dtype == torch.float64
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max error {float(err):.3e} vs scale {float(scale):.3e}"
    torch.testing.assert_close(actual, actual.T, rtol=0, atol=0)


def test_collector_matches_direct_xtx(tiny_llama):
    model = tiny_llama.model
    targets = select_targets(model)
    modules = {t.name: t.module for t in targets}
    batches = _batches()
    capture = _Capture(modules)
    try:
        with GramCollector(modules) as collector, torch.inference_mode():
            for b in batches:
                model(input_ids=b, use_cache=False)
    finally:
        capture.remove()
    total_tokens = sum(b.numel() for b in batches)
    assert set(collector.grams) == set(modules)
    for name, gram in collector.grams.items():
        expected, rows = capture.xtx(name)
        assert rows == total_tokens
        assert gram.tokens == total_tokens
        assert gram.dim == expected.shape[0]
        _assert_gram_close(gram.matrix, expected)


def test_shared_inputs_share_one_gram(tiny_llama):
    model = tiny_llama.model
    targets = select_targets(model)
    with GramCollector({t.name: t.module for t in targets}) as collector, torch.inference_mode():
        for b in _batches():
            model(input_ids=b, use_cache=False)
    grams = collector.grams
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        q, k, v = (grams[p + f"self_attn.{n}_proj"] for n in "qkv")
        assert q is k is v
        assert q.modules == [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"]
        gate, up = grams[p + "mlp.gate_proj"], grams[p + "mlp.up_proj"]
        assert gate is up
        assert gate is not q
        o, down = grams[p + "self_attn.o_proj"], grams[p + "mlp.down_proj"]
        assert len({id(q), id(gate), id(o), id(down)}) == 4
        assert down.dim == 2 * q.dim
    # 4 distinct Grams per block
    assert len(list(collector.unique())) == 4 * LAYERS


def test_hooks_removed_after_with(tiny_llama):
    targets = select_targets(tiny_llama.model)
    modules = {t.name: t.module for t in targets}
    before = {n: len(m._forward_pre_hooks) for n, m in modules.items()}
    with GramCollector(modules):
        assert all(len(m._forward_pre_hooks) == before[n] + 1 for n, m in modules.items())
    assert all(len(m._forward_pre_hooks) == before[n] for n, m in modules.items())


def test_hooks_removed_on_error(tiny_llama):
    targets = select_targets(tiny_llama.model)
    modules = {t.name: t.module for t in targets}
    with pytest.raises(RuntimeError, match="boom"):
        with GramCollector(modules):
            raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in modules.values())


@pytest.mark.parametrize("dim", [1, 3, 5, 8, 97])  # dims below, at and off the block count
def test_gram_add_accumulates(dim):
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 7, dim, generator=g)
    x2 = torch.randn(11, dim, generator=g, dtype=torch.bfloat16)  # bfloat16 activations (autocast)
    gram = Gram(modules=["m"], dim=dim)
    torch.testing.assert_close(gram.matrix, torch.zeros(dim, dim, dtype=torch.float64))
    gram.add(x1)
    rows1 = x1.reshape(-1, dim).double()
    _assert_gram_close(gram.matrix, rows1.T @ rows1)
    gram.add(x2)  # after the matrix was built: it must be rebuilt, lower blocks included
    x = torch.cat([x1.reshape(-1, dim), x2.float()]).double()
    assert gram.tokens == 25
    _assert_gram_close(gram.matrix, x.T @ x)
    torch.testing.assert_close(gram.matrix, gram.matrix.T, rtol=0, atol=0)


@pytest.mark.parametrize("block_final", [False, True])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_gpt2", "tiny_bert"])
def test_layer_loop_matches_whole_model(fixture, block_final, request):
    tiny = request.getfixturevalue(fixture)
    model = tiny.model
    targets = select_targets(model)
    batches = _batches(n_batches=2, batch=2, length=12, seed=3)
    whole = collect_grams_whole_model(model, batches, targets)
    looped = {}
    yielded = []
    for step in iterate_blocks(model, batches, targets):
        yielded.append(step.index)
        assert {t.name for t in step.targets} == {t.name for t in targets if t.block_index == step.index}
        looped.update(step.collect_grams(block_final=block_final))
    assert yielded == list(range(LAYERS))
    assert set(looped) == set(whole) == {t.name for t in targets}
    for name in whole:
        assert looped[name].tokens == whole[name].tokens == sum(b.numel() for b in batches)
        _assert_gram_close(looped[name].matrix, whole[name].matrix)
        assert looped[name].modules == whole[name].modules


def test_capture_block_inputs_stops_at_first_block(tiny_llama):
    model = tiny_llama.model
    batches = _batches(n_batches=3, batch=2, length=8)
    calls = []
    block1 = model.model.layers[1]
    handle = block1.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        inputs = capture_block_inputs(model, batches)
    finally:
        handle.remove()
    assert calls == []  # the forward pass stopped before block 1
    assert len(inputs) == 3
    with torch.inference_mode():
        expected = model.model.embed_tokens(batches[0])
    torch.testing.assert_close(inputs[0].hidden, expected, rtol=0, atol=0)


def test_layer_loop_skips_blocks_without_targets(tiny_llama):
    model = tiny_llama.model
    targets = [t for t in select_targets(model) if t.block_index == 1]
    batches = _batches()
    steps = list(iterate_blocks(model, batches, targets))
    assert [s.index for s in steps] == [1]


def test_whitened_energy_is_output_energy(tiny_llama):
    """Σσ² of the whitened spectrum of each target equals ‖W Xᵀ‖² over the inputs it saw."""
    model = tiny_llama.model
    targets = [t for t in select_targets(model) if t.block_index == 0]
    modules = {t.name: t.module for t in targets}
    batches = _batches()
    capture = _Capture(modules)
    try:
        with GramCollector(modules) as collector, torch.inference_mode():
            for b in batches:
                model(input_ids=b, use_cache=False)
    finally:
        capture.remove()
    results = analyze_grams(targets, collector.grams)
    for t, r in zip(targets, results):
        x = torch.cat(capture.rows[t.name])
        expected = float((t.weight().double() @ x.T).pow(2).sum())
        got = float((r.whitened.singular_values**2).sum())
        assert got == pytest.approx(expected, rel=1e-5)
        assert r.calibration_tokens == x.shape[0]


def test_a_step_that_made_the_next_inputs_refuses_to_run_again(tiny_llama):
    model = tiny_llama.model
    batches = _batches(n_batches=2, batch=2, length=12, seed=3)
    step = next(iterate_blocks(model, batches, select_targets(model)))
    step.collect_grams(block_final=True)  # its inputs are now the next block's
    with pytest.raises(RuntimeError, match="already produced"):
        step.collect_grams()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
def test_the_loop_writes_each_blocks_outputs_into_its_inputs_tensors(fixture, request):
    model = request.getfixturevalue(fixture).model
    batches = _batches(n_batches=2, batch=2, length=12, seed=3)
    pointers = []
    for step in iterate_blocks(model, batches, select_targets(model)):
        pointers.append([inp.hidden.data_ptr() for inp in step.inputs])
        step.collect_grams(block_final=step.index % 2 == 0)  # both ways of advancing
    assert len(pointers) == LAYERS and all(p == pointers[0] for p in pointers)


def test_products_follow_the_pass_precision():
    """What docs/calibration-precision.md states: under bfloat16 autocast the Gram's products are bfloat16 (rounded
    per batch), otherwise float32; the float64 sum is the same either way."""
    g = torch.Generator().manual_seed(0)
    x = 50 + torch.randn(1024, 32, generator=g)
    exact = x.double().T @ x.double()
    plain, lowered = Gram(modules=["m"], dim=32), Gram(modules=["m"], dim=32)
    plain.add(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered.add(x)

    def relative(m):
        return float((m - exact).abs().max() / exact.abs().max())

    assert relative(plain.matrix) < 1e-5  # float32 sums of 1024 products
    assert 1e-4 < relative(lowered.matrix) < 2 ** -7  # rounded to 8 significant bits, no worse


def test_output_gram_takes_the_bias_off_and_equals_w_g_wt():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 5, bias=True)
    with torch.no_grad():
        layer.bias.normal_(0, 1.0)
    x = torch.randn(3, 7, 12)
    with GramCollector({"narrow": layer}, outputs_of=["narrow"]) as collector, torch.no_grad():
        layer(x[:2])
        layer(x[2:])
    gram = collector.grams["narrow"]
    assert gram.of_outputs and gram.dim == 5 and gram.tokens == 21
    rows = x.reshape(-1, 12).double()
    w = layer.weight.detach().double()
    torch.testing.assert_close(gram.matrix, w @ rows.T @ rows @ w.T, rtol=1e-5, atol=1e-5)
