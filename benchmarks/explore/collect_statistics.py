"""Exploration, step 1: store SmolLM2's calibration statistics for metric_variants.py.

    [EXPLORE_DIR=DIR] python benchmarks/explore/collect_statistics.py [GRADIENT_WINDOWS, default 16]

Input Grams XᵀX of every target (64×512 tokens of wikitext2-valid, seed 0, original model) and
full output-gradient Grams GᵀG (next-token loss, GRADIENT_WINDOWS windows of 512) into
EXPLORE_DIR (default /tmp/compress-explore; about 1 GB). This is how the fisher metric was chosen; the
tool itself only keeps the gradient Gram's diagonal.
"""
import os
import sys
import time

import torch
from pathlib import Path
from torch import nn
from compressor.options import CalibrationOptions
from compressor import api
from compressor.loading import load_model
from compressor.targets import select_targets
from compressor.pipeline import iterate_blocks, CALIBRATION_BATCH
from compressor.calibration.grams import Gram

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
OUT = Path(os.environ.get("EXPLORE_DIR", "/tmp/compress-explore"))
OUT.mkdir(parents=True, exist_ok=True)
NGRAD = int(sys.argv[1]) if len(sys.argv) > 1 else 16
loaded = load_model("smollm2-135m")
model = loaded.model
cal = api.calibrate(loaded, CalibrationOptions(str(DATA / "wikitext2-valid.txt"), samples=64, seq_len=512, seed=0))
targets = select_targets(model)
t0 = time.time()
if not Path(OUT / "grams.pt").exists():
    grams = {}
    for step in iterate_blocks(model, cal.batches(CALIBRATION_BATCH), targets):
        g = step.collect_grams()
        mats = {}
        for t in step.targets:
            key = id(g[t.name])
            if key not in mats:
                mats[key] = g[t.name].matrix
            grams[t.name] = mats[key]
    torch.save(grams, OUT / "grams.pt")
    print("grams", time.time() - t0, flush=True)
# gradient grams
ggrams = {t.name: Gram([t.name], t.shape[0]) for t in targets}
hs = []
for t in targets:
    def hook(m, gi, go, name=t.name):
        ggrams[name].add(go[0].detach())
    hs.append(t.module.register_full_backward_hook(hook))
for p in model.parameters():
    p.requires_grad_(False)
hs.append(model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_()))
t0 = time.time()
for i, batch in enumerate(cal.batches(1)[:NGRAD]):
    with torch.enable_grad():
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="sum")
        loss.backward()
    print(i, time.time() - t0, flush=True)
torch.save({k: (g.matrix, g.tokens) for k, g in ggrams.items()}, OUT / f"ggrams{NGRAD}.pt")
print("done", time.time() - t0)
