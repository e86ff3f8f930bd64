"""compress: post-training compression of Hugging Face language models.

Importing the package registers the factored checkpoint format (``compress_lowrank``) with
transformers, so that stock ``from_pretrained`` loads factored checkpoints.
"""

__version__ = "0.1.0"

from compressor.formats.checkpoint import load_factored as load  # noqa: E402
from compressor.loading import LoadedModel, load_model  # noqa: E402

__all__ = ["LoadedModel", "__version__", "load", "load_model"]
