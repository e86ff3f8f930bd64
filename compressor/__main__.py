"""``python -m compressor``: the ``compress`` command, for where the entry point is not on PATH."""

from compressor.cli import main

if __name__ == "__main__":
    main()
