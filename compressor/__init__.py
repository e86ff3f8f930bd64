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
import warnings
from typing import Any

__version__ = "0.1.0"
__all__ = ["LoadedModel", "__version__", "load", "load_model"]

_LAZY = {
    "load": ("compressor.loading", "load_checkpoint"),  # a factored or a GPTQ checkpoint
    "load_model": ("compressor.loading", "load_model"),
    "LoadedModel": ("compressor.loading", "LoadedModel"),
}


def __getattr__(name: str) -> Any:
    """The public names, and subpackages (``compressor.api``, ``compressor.formats``), on first use."""
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
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
        try:
            _register_format()
        except Exception as e:  # noqa: BLE001 - transformers itself imported fine: warn, do not break it
            warnings.warn(f"compressor could not register its checkpoint format with transformers: {e}", stacklevel=2)

    def __getattr__(self, name: str) -> Any:  # resources, get_data, … as the real loader has them
        return getattr(self._loader, name)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers`` when it is found, then steps aside."""

    compressor_registration = True  # how a reload of this package recognises an installed hook

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname != "transformers":
            return None
        index = sys.meta_path.index(self)
        del sys.meta_path[index]  # find_spec below must not come back here
        spec = importlib.util.find_spec(fullname)  # the real one, from the finders after us
        if spec is None or spec.loader is None:  # not installed (yet): keep watching
            sys.meta_path.insert(index, self)
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register_format()
elif not any(getattr(f, "compressor_registration", False) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenImported())
