"""compress: post-training compression of Hugging Face language models.

Importing the package registers the factored checkpoint format (``compress_lowrank``) with
transformers, so that stock ``from_pretrained`` loads factored checkpoints. The registration
needs transformers (and torch), which take seconds to import: it runs at once where transformers
is already imported, else the moment it is, so that ``import compressor`` alone, and with it
``compress --help``, stays light. The public names below load on first use.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"
__all__ = ["LoadedModel", "__version__", "load", "load_model"]

_LAZY = {
    "load": ("compressor.formats.checkpoint", "load_factored"),
    "load_model": ("compressor.loading", "load_model"),
    "LoadedModel": ("compressor.loading", "LoadedModel"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


def _register_format() -> None:
    import compressor.formats.factored  # noqa: F401  (registers on import)


class _RegisteringLoader(importlib.abc.Loader):
    """transformers' own loader, which registers our format once transformers has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        self._loader.exec_module(module)
        _register_format()

    def __getattr__(self, name: str) -> Any:  # resources, get_data, … as the real loader has them
        return getattr(self._loader, name)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers`` the first time it is imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real one, from the finders after us
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register_format()
elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenImported())
