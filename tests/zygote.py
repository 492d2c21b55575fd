"""A warm process for the tests' script runs: it imports torch, diffusers and transformers once, then forks one
child per request, which runs the script as __main__ exactly as `python SCRIPT ARGS` would (its own process, its
own exit code, stdout and stderr to files). Each run saves the ~2.5 s of imports that dominate a toy-size run.

Protocol (one JSON object per line on stdin, one reply line on stdout):
    {"argv": [script, arg, ...], "cwd": DIR, "env": {...}, "out": FILE, "err": FILE, "timeout": SECONDS}
    -> {"rc": EXIT_CODE} (-N: killed by signal N; "timeout": true when it ran past its time and was killed)
The environment that matters at import time (OMP_NUM_THREADS, HF_HUB_OFFLINE) is the zygote's own, set by the
caller that starts it; the per-run env replaces os.environ before the script starts.
"""
import json
import os
import runpy
import signal
import sys
import time

import diffusers.models.unets.unet_2d
import torch
import transformers

PRELOADED = (diffusers.models.unets.unet_2d, torch, transformers)  # the heavy imports every script makes


def child(req: dict):
    """In the forked child: become `python argv...` and never return."""
    code = 1
    try:
        out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        script = os.path.abspath(req["argv"][0])
        sys.argv = [script] + req["argv"][1:]
        sys.path[0] = os.path.dirname(script)  # what `python script.py` puts first
        for p in reversed(req["env"].get("PYTHONPATH", "").split(os.pathsep)):
            if p and p not in sys.path:
                sys.path.insert(1, p)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - as the interpreter does: traceback on stderr, exit code 1
            import traceback
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main():
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            sys.stdin.close()
            child(req)
        deadline, timed_out = time.monotonic() + req.get("timeout", 600), False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
            time.sleep(0.02)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"rc": rc, "timeout": timed_out}), flush=True)


if __name__ == "__main__":
    main()
