"""Does stock transformers load a factored checkpoint as `compressor.load` does?

    python benchmarks/stock_load_check.py OUT

Loads OUT with `transformers.AutoModelForCausalLM.from_pretrained` (after `import compressor`,
nothing else) and with `compressor.load`, counts the FactoredLinear modules the stock loader
built, and compares both models' logits on a few tokens.
"""

from __future__ import annotations

import sys

import torch
import transformers

import compressor
from compressor.formats.factored import FactoredLinear


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = sys.argv[1]
    stock = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, _ = compressor.load(folder, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 260, 2341, 30, 216, 504, 314]]) % stock.config.vocab_size
    with torch.no_grad():
        identical = torch.equal(stock(ids).logits, ours(ids).logits)
    factored = sum(isinstance(m, FactoredLinear) for m in stock.modules())
    print(f"{factored} FactoredLinear modules; logits identical to compressor.load: {identical}")
    sys.exit(0 if identical and factored else 1)


if __name__ == "__main__":
    main()
