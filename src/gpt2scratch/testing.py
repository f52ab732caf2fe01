"""Tools shared by the tests, the benchmarks and scripts that drive gpt2scratch from outside, as a user would.

    run_cli("train", "--preset", "tiny", ...)     `gpt2scratch ARGS` in a subprocess (captured output)
    torchrun("train", ..., nproc=2)               the same under `torchrun --standalone` (gloo on a CPU)
    with ServerProcess(model, "--api-key", k):    `gpt2scratch serve` on a free loopback port, ready on /health
    write_random_model(folder, config)            a random GPT in a model folder that generate/serve/eval open
    train_one_and_two(args, out)                  train_loss per step of one process and of two under torchrun
    same_weights(run_a, run_b, step)              two runs' checkpoints of a step hold bit-identical weights

Only the standard library, torch and gpt2scratch are needed (no HTTP client library).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from gpt2scratch import checkpoint
from gpt2scratch.config import Config, GPTConfig, TrainingConfig
from gpt2scratch.dataset.tokenizer import GPT2_DIR
from gpt2scratch.models import GPT

COMMAND = [sys.executable, "-m", "gpt2scratch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`gpt2scratch ARGS` as a user runs it; stdout and stderr captured as text."""
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m gpt2scratch ARGS`, one thread per process (2 cores here)."""
    command = [*TORCHRUN, f"--nproc_per_node={nproc}", "-m", "gpt2scratch", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def write_random_model(folder: str | Path, config: GPTConfig, seed: int = 0, head_scale: float = 1.0) -> Path:
    """A randomly initialised GPT with GPT-2's tokenizer, written as a model folder (model.safetensors,
    state.json, tokenizer/). head_scale > 1 sharpens its next-token distribution, so that greedy choices are
    not near-ties."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    state = {"step": 0, "config": Config(model=config, training=TrainingConfig()).to_dict()}
    checkpoint.write_model_folder(folder, model.state_dict(), state, GPT2_DIR)
    return Path(folder)


def read_metrics(run_dir: str | Path, key: str = "train_loss") -> dict[int, float]:
    """{step: value} of `key` from a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def copy_checkpoint(from_run: str | Path, to_run: str | Path, step: int) -> None:
    """RUN/ckpt/step_N of one run into another (empty) run folder, for a resume from it."""
    name = f"step_{step:06d}"
    (Path(to_run) / checkpoint.CKPT_DIR).mkdir(parents=True)
    shutil.copytree(Path(from_run) / checkpoint.CKPT_DIR / name, Path(to_run) / checkpoint.CKPT_DIR / name)


def same_weights(run_a: str | Path, run_b: str | Path, step: int) -> bool:
    """Whether two runs' checkpoints of `step` hold bit-identical weights (a resumed run against a whole one)."""
    name = f"step_{step:06d}"
    a = checkpoint.load_model_state(Path(run_a) / checkpoint.CKPT_DIR / name)
    b = checkpoint.load_model_state(Path(run_b) / checkpoint.CKPT_DIR / name)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_one_and_two(args: list[str], out: str | Path) -> tuple[dict[int, float], dict[int, float]]:
    """`gpt2scratch train ARGS` in one process (OUT/one) and under torchrun with two (OUT/two); both must
    succeed. Their {step: train_loss}."""
    one = run_cli("train", *args, "--out", str(Path(out) / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun("train", *args, "--out", str(Path(out) / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return read_metrics(Path(out) / "one"), read_metrics(Path(out) / "two")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`gpt2scratch serve MODEL OPTIONS` in a subprocess on a free loopback port; `url` answers once started.
    Its output goes to a temporary file (a pipe nobody reads could fill up and stall the server)."""

    def __init__(
        self,
        model: str | Path,
        *options: str,
        port: int | None = None,
        start_timeout: float = 120,
        env: dict[str, str] | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [*COMMAND, "serve", str(model), "--port", str(self.port), "--log-level", "warning", *options]
        self._output = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}: {self.output()}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer within {start_timeout:g} s: {self.output()}")

    def health(self) -> dict:
        """GET /health as a dict (an OSError while the server is not up)."""
        with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
            return json.load(response)

    def output(self) -> str:
        """What the server printed so far (all of it, after stop())."""
        if self._output.closed:
            return self._printed
        self._output.seek(0)
        return self._output.read()

    def stop(self) -> str:
        """Terminate the server (Ctrl-C's path: open requests finish) and return what it printed."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        if not self._output.closed:
            self._printed = self.output()
            self._output.close()
        return self._printed

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
