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
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and drlhf.speed.default_threads follows it
    torch.set_num_threads(1)


def _user_files() -> dict:
    """What the checkout's runs/ and datasets/ hold (a user's work): path -> (size, mtime)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for top in ("runs", "datasets") if (ROOT / top).exists()
            for p in [ROOT / top, *(ROOT / top).rglob("*")]}


@pytest.fixture(scope="session", autouse=True)
def checkout_left_alone():
    """The suite never writes into the checkout's runs/ or datasets/ (where the quick start's own run lives)."""
    before = _user_files()
    yield
    if _user_files() != before:
        pytest.fail("the test suite changed the checkout's runs/ or datasets/: a script ran without its output folder "
                    "in a temporary directory")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The toy models of the whole run, shared by parallel workers (drlhf.toys trains each once, under a lock)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "drlhf-cache"
    path.mkdir(exist_ok=True)
    return path


class Zygote:
    """tests/zygote.py: forks each script run from a process that has the heavy libraries imported already (the
    same process semantics as `python SCRIPT ...`, ~2.5 s less per run). DRLHF_TEST_FORK=0 runs plain subprocesses."""

    def __init__(self, env: dict, tmp: Path):
        self.env, self.tmp, self.proc, self.n = env, tmp, None, 0

    def __call__(self, cmd: list, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
        import json
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py")], cwd=self.tmp, env=self.env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.n += 1
        out, err = self.tmp / f"{self.n}.out", self.tmp / f"{self.n}.err"
        self.proc.stdin.write(json.dumps(dict(argv=cmd[1:], cwd=str(cwd), env=self.env, out=str(out), err=str(err),
                                              timeout=timeout)) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if reply["timeout"]:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, reply["rc"], stdout, stderr)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def run(cache_dir, tmp_path_factory):
    """Run a script of the project in its own process, offline, with the test cache, in a new empty working
    directory of its own (`run.cwd` after the call): a default output folder (runs/..., datasets/...) lands there,
    never in the checkout, and nothing of a user's runs/ or datasets/ is seen. Returns CompletedProcess."""
    env = dict(os.environ, DRLHF_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    zygote = Zygote(env, tmp_path_factory.mktemp("runs")) if os.environ.get("DRLHF_TEST_FORK", "1") != "0" else None

    def _run(*argv, check=True, launcher=None, timeout=600, cwd=None):
        argv = [str(a) for a in argv]
        script = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
        if script is not None and not os.path.isabs(argv[script]) and (ROOT / argv[script]).is_file():
            argv[script] = str(ROOT / argv[script])  # the checkout's script, run from elsewhere
        cmd = (launcher or [sys.executable]) + argv
        _run.cwd = Path(cwd or tmp_path_factory.mktemp("cwd"))
        if zygote is not None and launcher is None and cmd[1].endswith(".py"):
            proc = zygote(cmd, timeout, _run.cwd)
        else:
            proc = subprocess.run(cmd, cwd=_run.cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc
    _run.cache_dir = cache_dir
    yield _run
    if zygote is not None:
        zygote.close()
