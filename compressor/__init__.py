"""compress: post-training compression of Hugging Face language models."""

__version__ = "0.1.0"

from compressor.loading import LoadedModel, load_model  # noqa: E402

__all__ = ["LoadedModel", "__version__", "load_model"]
