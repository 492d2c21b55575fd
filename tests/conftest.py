import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# toy-size settings shared by the subprocess smoke runs: a base model trained for 8 steps (noise, but the
# full code path), 4 environments x 5 steps, minibatches of 5 states
TINY = ["--toy-train-steps", "8", "--num-envs", "4", "--num-steps", "5", "--minibatch-size", "5",
        "--eval-samples", "4", "--eval-every", "1", "--policy-warmup-steps", "2", "--vf-warmup-steps", "2"]


if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: a second torch thread would wait for a busy core
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The toy models of the whole run, shared by parallel workers (drlhf.toys trains each once, under a lock)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "drlhf-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def run(cache_dir):
    """Run a script of the project in a subprocess, offline, with the test cache; returns CompletedProcess."""
    def _run(*argv, check=True, launcher=None, timeout=600):
        env = dict(os.environ, DRLHF_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        cmd = (launcher or [sys.executable]) + [str(a) for a in argv]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc
    _run.cache_dir = cache_dir
    return _run
