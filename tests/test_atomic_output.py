"""Outputs appear whole or not at all: killed runs (SIGKILL), Ctrl-C, a full disk, an output that
is the input, and ``--json`` files. The signal tests run the real command in a subprocess."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import compressor
from compressor import api, report
from compressor.cli import run
from compressor.errors import OutOfResourcesError, UsageError
from compressor.formats.atomic import atomic_dir, check_destination, output_error, remove_stale, scratch_prefix
from compressor.options import CompensateOptions, FactorizeOptions, QuantizeOptions

# ------------------------------------------------------------------------------- helpers


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(done.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def _sibling(dest: Path, kind: str, pid: int, host: str | None = None) -> Path:
    """A hidden sibling of ``dest`` named as if process ``pid`` (of this machine) had made it."""
    name = scratch_prefix(dest, kind).replace(f"-{os.getpid()}-", f"-{pid}-")
    if host is not None:
        name = re.sub(r"-[0-9a-f]{8}-", f"-{host}-", name, count=1)
    folder = dest.parent / f"{name}0123456789ab"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _factorize_args(tiny, text_file, out: Path) -> list[str]:
    return ["factorize", str(tiny.path), "--target", "0.5", "--calib", str(text_file),
            "--calib-samples", "4", "--seq-len", "16", "-o", str(out)]  # fmt: skip


# ------------------------------------------------------------- stale siblings of killed runs


def test_partial_names_say_which_process_wrote_them(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        assert tmp.name.startswith(".out.partial-") and f"-{os.getpid()}-" in tmp.name
        assert tmp.name.startswith(scratch_prefix(dest, "partial"))
    assert _names(tmp_path) == ["out"]


def test_siblings_of_dead_processes_are_removed_and_no_others(tmp_path):
    dest = tmp_path / "out"
    dead = _dead_pid()
    stale = [_sibling(dest, kind, dead) for kind in ("partial", "spill", "gptq")]
    alive = _sibling(dest, "partial", os.getppid())  # pytest's parent: running
    elsewhere = _sibling(dest, "partial", dead, host="00000000")  # another machine's: cannot be told
    other_output = _sibling(tmp_path / "out2", "partial", dead)  # another destination's
    legacy = tmp_path / ".out.partial-0123456789ab"  # named before pids were: left alone
    legacy.mkdir()
    with atomic_dir(dest) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert not any(p.exists() for p in stale)
    assert alive.is_dir() and elsewhere.is_dir() and other_output.is_dir() and legacy.is_dir()
    assert (dest / "done.txt").read_text() == "ok"


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    dest = tmp_path / "out"
    old = _sibling(dest, "old", _dead_pid())  # killed between its two renames: out is missing
    with pytest.raises(UsageError, match="not empty"):  # back in place, so not replaced unasked
        check_destination(dest)
    assert _names(tmp_path) == ["out"] and (dest / "model.safetensors").is_file() and not old.exists()
    old = _sibling(dest, "old", _dead_pid())  # the output is there: the copy aside is only garbage
    assert remove_stale(dest) == [old]
    assert _names(tmp_path) == ["out"]


def test_killed_factorize_leaves_nothing_that_stops_the_next_run(tiny_llama, text_file, tmp_path):
    """A real ``compress factorize`` killed with SIGKILL while it writes its shards; then again."""
    out = tmp_path / "work" / "out"
    proc, marker = _start_blocked(tmp_path, "compressor.formats.writer:save_file", after=True,
                                  argv=[sys.executable, "-m", "compressor", *_factorize_args(tiny_llama, text_file, out)])  # fmt: skip
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    left = _names(out.parent)
    assert not out.exists()
    assert {n.split("-")[0] for n in left} == {".out.partial", ".out.spill"}, left
    assert all(f"-{proc.pid}-" in n for n in left)
    assert run(_factorize_args(tiny_llama, text_file, out)) == 0
    assert _names(out.parent) == ["out"]
    model, _ = compressor.load(out)
    assert model is not None


# --------------------------------------------------------------------------------- Ctrl-C


_HOOK = '''
"""Test hook: make {target} block (after it ran, if asked), so the test can signal the process."""
import importlib, os, pathlib, time

_module_name, _attr = {target!r}.split(":")
_module = importlib.import_module(_module_name)
_real = getattr(_module, _attr)


def _blocked(*args, **kwargs):
    result = _real(*args, **kwargs) if {after!r} else None
    pathlib.Path({marker!r}).write_text(str(os.getpid()))
    time.sleep(300)
    return result


setattr(_module, _attr, _blocked)
'''


def _start_blocked(tmp_path: Path, target: str, after: bool, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start ``argv`` with ``target`` (module:function) made to block, through a sitecustomize
    on PYTHONPATH: the command runs as users run it. SIGINT is given its default action in the
    child (a shell without job control starts background commands with it ignored)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    marker = tmp_path / "blocked"
    (hook / "sitecustomize.py").write_text(textwrap.dedent(_HOOK.format(target=target, after=after, marker=str(marker))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    return proc, marker


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the command ended ({proc.returncode}) before it blocked:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the command never reached the blocked call")
        time.sleep(0.05)


def _interrupt(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def test_ctrl_c_while_writing_exits_130_and_leaves_nothing(tiny_llama, text_file, tmp_path):
    """``python -m compressor factorize``, interrupted after its first shard is written."""
    out = tmp_path / "work" / "out"
    proc, marker = _start_blocked(tmp_path, "compressor.formats.writer:save_file", after=True,
                                  argv=[sys.executable, "-m", "compressor", *_factorize_args(tiny_llama, text_file, out)])  # fmt: skip
    _wait_for(marker, proc)
    assert any(p.name.startswith(".out.partial-") for p in out.parent.iterdir())  # it was writing
    code, err = _interrupt(proc)
    assert code == 130, err
    assert "Traceback" not in err and "error: interrupted" in err
    assert _names(out.parent) == []


def test_ctrl_c_while_computing_exits_130_and_leaves_nothing(tiny_llama, text_file, tmp_path):
    """The ``compress`` entry point, interrupted while it factors (its spill folder in use)."""
    out = tmp_path / "work" / "out"
    entry = Path(sys.executable).with_name("compress")
    if not entry.is_file():
        pytest.skip(f"no entry point at {entry}")
    proc, marker = _start_blocked(tmp_path, "compressor.factorize:factorize_model", after=False,
                                  argv=[str(entry), *_factorize_args(tiny_llama, text_file, out)])  # fmt: skip
    _wait_for(marker, proc)
    assert any(p.name.startswith(".out.spill-") for p in out.parent.iterdir())
    code, err = _interrupt(proc)
    assert code == 130, err
    assert "Traceback" not in err and "error: interrupted" in err
    assert _names(out.parent) == []


# ------------------------------------------------------------------------------ full disk


def _full_disk(*args, **kwargs):
    """A writer that writes a little of its file, then fails as a full disk does."""

    def write(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    return write


def test_full_disk_factorize_exits_5_and_leaves_nothing(tiny_llama, text_file, tmp_path, monkeypatch, capsys):
    from compressor.formats import writer

    monkeypatch.setattr(writer, "save_file", _full_disk())
    out = tmp_path / "work" / "out"
    assert run(_factorize_args(tiny_llama, text_file, out) + ["--json", str(tmp_path / "work" / "r.json")]) == 5
    assert "disk" in capsys.readouterr().err
    assert _names(out.parent) == []
    with pytest.raises(OutOfResourcesError):  # the Python API says the same
        api.factorize(str(tiny_llama.path), FactorizeOptions(0.5, method="svd", alloc="uniform"), output=out)
    assert _names(out.parent) == []


def test_full_disk_while_spilling_factors_exits_5_and_leaves_nothing(tiny_llama, text_file, tmp_path, monkeypatch):
    from compressor.residency import Spill

    real_hold = Spill.hold

    def hold(self, tensor):
        if self._count == 3:  # a few factors spilled, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_hold(self, tensor)

    monkeypatch.setattr(Spill, "hold", hold)
    out = tmp_path / "work" / "out"
    assert run(_factorize_args(tiny_llama, text_file, out)) == 5
    assert _names(out.parent) == []
    with pytest.raises(OutOfResourcesError):
        api.factorize(str(tiny_llama.path), FactorizeOptions(0.5, method="svd", alloc="uniform"), output=out)
    assert _names(out.parent) == []


def test_full_disk_quantize_exits_5_and_leaves_nothing(tiny_llama, tmp_path, monkeypatch, capsys):
    from compressor.formats import writer

    monkeypatch.setattr(writer, "save_file", _full_disk())
    out = tmp_path / "work" / "out"
    assert run(["quantize", str(tiny_llama.path), "--bits", "4", "--group-size", "32", "-o", str(out)]) == 5
    assert "disk" in capsys.readouterr().err
    assert _names(out.parent) == []
    with pytest.raises(OutOfResourcesError):
        api.quantize(str(tiny_llama.path), QuantizeOptions(4, group_size=32), output=out)
    assert _names(out.parent) == []


@pytest.fixture(scope="module")
def quantized_llama(tiny_llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quantized") / "llama-w4"
    api.quantize(str(tiny_llama.path), QuantizeOptions(4, group_size=32), output=folder)
    return folder


def test_full_disk_compensate_exits_5_and_leaves_nothing(tiny_llama, quantized_llama, text_file, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk())
    out = tmp_path / "work" / "adapter"
    code = run(["compensate", str(tiny_llama.path), str(quantized_llama), "--rank", "4", "--calib", str(text_file),
                "--calib-samples", "4", "--seq-len", "16", "-o", str(out)])  # fmt: skip
    assert code == 5
    assert "disk" in capsys.readouterr().err
    assert _names(out.parent) == []
    with pytest.raises(OutOfResourcesError):
        api.compensate(str(tiny_llama.path), str(quantized_llama), CompensateOptions(rank=2, method="svd"), output=out)
    assert _names(out.parent) == []


@pytest.mark.parametrize(
    "code,expected",
    [(errno.ENOSPC, OutOfResourcesError), (errno.EDQUOT, OutOfResourcesError), (errno.EACCES, UsageError),
     (errno.EROFS, UsageError), (errno.EIO, None), (errno.ENOENT, None)],  # fmt: skip
)
def test_only_a_full_disk_is_out_of_resources(code, expected):
    error = output_error(OSError(code, os.strerror(code)), "/x/out")
    assert (None if error is None else type(error)) is expected
    if error is not None:
        assert "/x/out" in str(error) and os.strerror(code) in str(error)


def test_atomic_dir_labels_a_full_disk_and_nothing_else(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(OutOfResourcesError, match="out of disk space"):
        with atomic_dir(dest) as tmp:
            (tmp / "half").write_bytes(b"\0")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as caught:  # an input/output error stays what it is
        with atomic_dir(dest):
            raise OSError(errno.EIO, "Input/output error")
    assert caught.value.errno == errno.EIO
    assert _names(tmp_path) == []


def test_output_under_a_file_is_refused_before_loading(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compressor.loading, "load_model", _no_load)
    (tmp_path / "file").write_text("x")
    code = run(["quantize", str(tiny_llama.path), "--bits", "4", "--group-size", "32", "-o", str(tmp_path / "file" / "out")])
    assert code == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ output is the input


def _no_load(*args, **kwargs):
    raise AssertionError("the model should not be loaded")


@pytest.fixture
def model_copy(tiny_llama, tmp_path) -> Path:
    """A copy of the tiny LLaMA inside ``tmp_path/models`` (the tests point outputs at and around it)."""
    folder = tmp_path / "models" / "llama"
    shutil.copytree(tiny_llama.path, folder)
    return folder


def _outputs_on(model: Path) -> dict[str, Path]:
    return {"itself": model, "inside": model / "sub" / "out", "around": model.parent}


@pytest.mark.parametrize("where", ["itself", "inside", "around"])
@pytest.mark.parametrize("command", ["factorize", "quantize", "compensate", "export-dense"])
def test_output_on_the_input_is_refused_before_loading(model_copy, text_file, monkeypatch, capsys, command, where):
    from compressor.formats import checkpoint

    monkeypatch.setattr(compressor.loading, "load_model", _no_load)
    monkeypatch.setattr(checkpoint, "load_factored", _no_load)
    before = {p: p.stat().st_mtime_ns for p in model_copy.parent.rglob("*")}
    out = str(_outputs_on(model_copy)[where])
    m = str(model_copy)
    argv = {
        "factorize": ["factorize", m, "--target", "0.5", "--calib", str(text_file), "-o", out],
        "quantize": ["quantize", m, "--bits", "4", "--group-size", "32", "-o", out],
        "compensate": ["compensate", m, m, "--rank", "2", "-o", out],
        "export-dense": ["export-dense", m, "-o", out],
    }[command]
    assert run([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "the output" in err and "input" in err, err
    assert {p: p.stat().st_mtime_ns for p in model_copy.parent.rglob("*")} == before


def test_output_on_the_input_through_a_symlink_or_the_api(model_copy, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(model_copy.parent, target_is_directory=True)
    with pytest.raises(UsageError, match="holds the input"):
        api.quantize(str(model_copy), QuantizeOptions(4, group_size=32), output=link, overwrite=True)
    loaded = compressor.load_model(str(model_copy))  # a loaded model knows its folder
    with pytest.raises(UsageError, match="is the input"):
        api.factorize(loaded, FactorizeOptions(0.5, method="svd", alloc="uniform"), output=link / "llama", overwrite=True)
    assert (model_copy / "config.json").is_file()


def test_an_output_beside_the_input_is_fine(model_copy, tmp_path):
    out = model_copy.parent / "llama-w4"  # same parent, a name that starts like the input's
    api.quantize(str(model_copy), QuantizeOptions(4, group_size=32), output=out)
    assert (out / "config.json").is_file()


# ---------------------------------------------------------------------------- --json files


def test_write_json_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    report.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    stale = tmp_path / f"{scratch_prefix(path, 'partial').replace(f'-{os.getpid()}-', f'-{_dead_pid()}-')}x"
    stale.write_text('{"a": ')  # a killed run's
    real_replace = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.os, "replace", full)
    with pytest.raises(OutOfResourcesError):
        report.write_json(path, {"a": 2})
    assert _names(tmp_path) == ["r.json"]  # the stale one is gone, and this one's temporary file
    assert json.loads(path.read_text()) == {"a": 1}
    monkeypatch.setattr(report.os, "replace", real_replace)
    with pytest.raises(TypeError):  # not JSON: nothing written
        report.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and _names(tmp_path) == ["r.json"]
    with pytest.raises(UsageError):
        report.write_json(path / "x.json", {"a": 3})  # under a file


def test_json_report_of_a_run_is_replaced_atomically(tiny_llama, tmp_path):
    out, path = tmp_path / "q", tmp_path / "q.json"
    path.write_text("old")
    assert run(["quantize", str(tiny_llama.path), "--bits", "4", "--group-size", "32", "-o", str(out), "--json", str(path)]) == 0
    assert json.loads(path.read_text())["bits"] == 4
    assert _names(tmp_path) == ["q", "q.json"]
