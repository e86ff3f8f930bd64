"""Pure tensor functions: no model, no I/O. Decompositions run in float64."""
