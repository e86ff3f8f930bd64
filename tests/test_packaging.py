"""Nothing of ours can shadow another distribution's top-level package.

transformers imports Hugging Face's kernel-hub package, named ``kernels``; a ``kernels`` (or
``calibration``) importable from the repository root would be found first whenever Python runs
there (``python -m pytest``, ``python -c``, a notebook), and break ``import transformers``.
"""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("kernels", "calibration")

# Run in the repository root, where '' (the current folder) comes first on sys.path.
PROBE = textwrap.dedent(
    """
    import importlib.machinery, importlib.util, os, sys
    {hide}
    import transformers.modeling_utils  # imports `kernels` where that package is installed
    import compressor, compressor.calibration, compressor.kernels
    root = os.path.realpath(os.getcwd())
    for name in {ours!r}:
        spec = importlib.util.find_spec(name)
        where = spec and (spec.origin or list(spec.submodule_search_locations or []))
        assert spec is None or "-packages" in str(where), f"{{name}} resolves outside site-packages: {{where}}"
    assert os.path.realpath(compressor.__file__).startswith(root)
    print("ok", importlib.util.find_spec("kernels") is not None)
    """
)

# Simulates an environment without Hugging Face's `kernels`: the path finder no longer sees it in
# site-packages (every other entry of sys.path, the repository root first, is still searched).
HIDE_INSTALLED_KERNELS = textwrap.dedent(
    """
    class _Hidden(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] == "kernels" and path is None:
                path = [p for p in sys.path if "-packages" not in p]
            return importlib.machinery.PathFinder.find_spec(name, path, target)
    sys.meta_path[:] = [_Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    """
)


def test_repository_root_holds_no_importable_kernels_or_calibration():
    for name in OURS:
        assert importlib.machinery.PathFinder.find_spec(name, [str(ROOT)]) is None, f"{ROOT / name} is importable"


@pytest.mark.parametrize("installed", [True, False], ids=["hf-kernels-installed", "hf-kernels-absent"])
def test_transformers_and_compressor_import_from_the_repository_root(installed):
    code = PROBE.format(hide="" if installed else HIDE_INSTALLED_KERNELS, ours=OURS)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ok, found = done.stdout.split()[-2:]
    assert ok == "ok"
    if not installed:
        assert found == "False"


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_cli_parses_without_torch_or_transformers():
    """`compress --help` and flag errors answer at once: nothing heavy is imported to parse."""
    printed = _python(
        """
        import sys
        from compressor.cli import run
        assert run(["--help"]) == 0
        assert run(["factorize", "--help"]) == 0
        assert run(["factorize", "m", "--target", "2", "-o", "x"]) == 2
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
        """
    )
    assert printed.splitlines()[-1] == "[]"


@pytest.mark.parametrize("order", ["compressor first", "transformers first"])
def test_import_compressor_registers_the_format_with_transformers(order):
    first, second = ("compressor", "transformers") if order == "compressor first" else ("transformers", "compressor")
    printed = _python(
        f"""
        import {first}
        import {second}
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
        print("compress_lowrank" in AUTO_QUANTIZATION_CONFIG_MAPPING and "compress_lowrank" in AUTO_QUANTIZER_MAPPING)
        """
    )
    assert printed.splitlines()[-1] == "True"
