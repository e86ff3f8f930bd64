"""Checkpoint formats written by compressor. Importing this package registers the factored
(``compress_lowrank``) format with transformers."""

from compressor.formats.atomic import atomic_dir
from compressor.formats.checkpoint import FactoredFolder, load_factored, save_factored, validate_factored_folder
from compressor.formats.factored import (
    FORMAT_VERSION,
    QUANT_METHOD,
    FactoredLinear,
    LowRankConfig,
    LowRankQuantizer,
    apply_factors,
    export_dense,
    factored_modules,
)

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "FactoredFolder",
    "FactoredLinear",
    "LowRankConfig",
    "LowRankQuantizer",
    "apply_factors",
    "atomic_dir",
    "export_dense",
    "factored_modules",
    "load_factored",
    "save_factored",
    "validate_factored_folder",
]
