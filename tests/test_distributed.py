"""torchrun: two processes (gloo, CPU) share the calibration windows and the decompositions, and
write the same checkpoint as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from compressor import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compress(args: list[str], processes: int, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "COMPRESS_STREAM_MIN_BYTES": "0"}  # streamed, as a big model would be
    if processes == 1:
        command = [sys.executable, "-m", "compressor", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "compressor", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("mode", ["--one-shot", "--sequential"])
def test_two_processes_write_the_checkpoint_one_process_writes(tiny_llama, text_file, tmp_path, mode):
    common = ["factorize", str(tiny_llama.path), "--target", "0.6", "--calib", str(text_file), "--calib-samples", "8",
              "--seq-len", "24", "--device", "cpu", mode]
    one = _compress([*common, "-o", str(tmp_path / "one")], 1, tmp_path)
    assert one.returncode == 0, one.stderr
    two = _compress([*common, "-o", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")], 2, tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") <= 1 and "kept" in two.stdout  # process 0 alone reports
    ranks = [json.loads((tmp_path / n / "config.json").read_text())["quantization_config"]["ranks"] for n in ("one", "two")]
    assert ranks[0] == ranks[1]
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    record = json.loads((tmp_path / "two.json").read_text())
    assert record["processes"] == 2 and record["plan"]["modules"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers  # no process left a scratch folder behind


def test_sharing_outside_torchrun_is_the_identity():
    assert not distributed.active()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    t = torch.ones(3)
    assert distributed.sum_(t) is t and distributed.sum_int(5) == 5
    assert distributed.split_work(["a", "b"], lambda names: {n: n.upper() for n in names}) == {"a": "A", "b": "B"}
