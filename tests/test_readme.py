"""The README's CLI reference is checked against the real command definitions."""

import re
from pathlib import Path

import typer

from compressor.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _sections() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    parts = re.split(r"^### `compress ([a-z-]+)", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_command_is_documented_with_every_option():
    command = typer.main.get_command(app)
    sections = _sections()
    assert set(command.commands) == set(sections), "README sections and CLI commands differ"
    for name, sub in command.commands.items():
        section = sections[name]
        for param in sub.params:
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}`" in section, f"README section of {name} lacks {opt}"


def test_global_options_are_documented():
    text = README.read_text(encoding="utf-8")
    command = typer.main.get_command(app)
    for param in command.params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert f"`{opt}`" in text.split("### Global options", 1)[1]


def test_readme_commands_name_real_flags():
    """Every `compress CMD --flag` written in the README's code names a flag the command has."""
    command = typer.main.get_command(app)
    text = README.read_text(encoding="utf-8")
    for cmd, rest in re.findall(r"compress ([a-z-]+) ([^\n`|&;]*)", text):
        if cmd not in command.commands:
            continue
        known = {o for p in command.commands[cmd].params for o in (*p.opts, *p.secondary_opts)}
        for flag in re.findall(r"(--[a-z0-9-]+)", rest):
            assert flag in known, f"README uses {flag} with compress {cmd}"
