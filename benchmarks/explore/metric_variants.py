"""Exploration, step 2: perplexity of factorization metrics from the statistics of collect_statistics.py.

    [EXPLORE_DIR=DIR] python benchmarks/explore/metric_variants.py GRADIENT_WINDOWS TARGET CONFIG...

CONFIG is KIND[:DAMPING[:FLOOR]]: ``input`` (input whitening, one loss factor per layer:
the former default), ``diag`` (output weights from the gradient Gram's diagonal: the fisher
method), ``full`` (the full gradient Gram, K-FAC style), ``alloc-full`` (ranks from ``full``,
factors input-whitened). All one-shot, water-filling allocation with half-uniform floors;
evaluation as in factorize_quality.py (32 windows of 512 of wikitext2-raw-test).
"""
import copy
import json
import os
import sys
import time

import torch
from pathlib import Path
from compressor.loading import load_model
from compressor.targets import select_targets
from compressor.calibration.sources import tokenize_text
from compressor.evaluate import perplexity
from compressor.math.spectra import gram_root
from compressor.math import allocate
from compressor.formats.factored import apply_factors

OUT = Path(os.environ.get("EXPLORE_DIR", "/tmp/compress-explore"))
NG = sys.argv[1]
target = float(sys.argv[2])
configs = sys.argv[3:]
loaded = load_model("smollm2-135m")
original = loaded.model
eval_ids = tokenize_text(loaded.tokenizer, (Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2-raw-test.txt").read_text())
grams = torch.load(OUT / "grams.pt")
gg = torch.load(OUT / f"ggrams{NG}.pt")
targets = select_targets(original)
shapes = [t.shape for t in targets]
roots = {}
for t in targets:
    key = id(grams[t.name])
    if key not in roots:
        roots[key] = gram_root(grams[t.name])
S = {t.name: roots[id(grams[t.name])] for t in targets}

def out_root(name, kind, lam):
    g, n = gg[name]
    g = g / n
    if kind == "diag":
        d = g.diagonal().clamp_min(0)
        d = d + lam * d.mean()
        return torch.diag(d.sqrt())
    g = g + lam * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.cholesky(g)

def run(cfg):
    parts = cfg.split(":")
    kind = parts[0]  # input | diag | full | alloc-full (alloc from full, factors input-only)
    lam = float(parts[1]) if len(parts) > 1 else 0.0
    floor = float(parts[2]) if len(parts) > 2 else 0.5
    t0 = time.time()
    decs, energies, weights = {}, [], []
    for t in targets:
        W = t.weight().to(torch.float64)
        if kind == "input":
            L = None
        else:
            L = out_root(t.name, "diag" if kind.endswith("diag") else "full", lam)
        M = W @ S[t.name] if L is None else L.T @ W @ S[t.name]
        u, sv, _ = torch.linalg.svd(M, full_matrices=False)
        decs[t.name] = (u, L)
        energies.append(sv ** 2)
        if kind == "input":
            g, n = gg[t.name]
            weights.append(float(g.diagonal().sum() / n / t.shape[0]))
        else:
            weights.append(1.0)
    uni = allocate.uniform_plan(shapes, target)
    floors = [int(floor * (r if r is not None else allocate.max_factored_rank(s))) for r, s in zip(uni, shapes)]
    ranks = allocate.greedy_plan(energies, shapes, target, weights=weights, floors=floors)
    ranks = allocate.fill_budget(ranks, energies, shapes, target, weights)
    model = copy.deepcopy(original)
    ts = select_targets(model)
    factors = {}
    pred = 0.0
    for t, r, e, w in zip(ts, ranks, energies, weights):
        if r is None:
            continue
        pred += w * float(e[r:].sum())
        u, L = decs[t.name]
        W = t.weight().to(torch.float64)
        ur = u[:, :r]
        if L is None or kind.startswith("alloc"):
            if kind.startswith("alloc"):
                uu, _, _ = torch.linalg.svd(W @ S[t.name], full_matrices=False)
                ur = uu[:, :r]
            b, a = ur, ur.T @ W
        else:
            a = ur.T @ L.T @ W
            b = torch.linalg.solve_triangular(L.T, ur, upper=True) if kind.endswith("full") else ur / L.diagonal()[:, None]
        factors[t.name] = (b.float().contiguous(), a.float().contiguous())
    apply_factors(model, factors)
    kept = allocate.kept_fraction(ranks, shapes)
    byt = {}
    for t, r in zip(ts, ranks):
        byt.setdefault(t.layer_type, []).append(r if r is not None else -1)
    ppl = perplexity(model, eval_ids, seq_len=512, max_windows=32, batch_size=8).perplexity
    row = dict(cfg=cfg, target=target, kept=round(kept, 4), pred=pred, ppl=ppl, s=round(time.time() - t0))
    print(json.dumps(row), flush=True)
    print({k: v[:6] + ["..."] + v[-3:] for k, v in byt.items()}, flush=True)

for c in configs:
    run(c)
