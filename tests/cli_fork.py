"""`python -m gentrain ARGS` in a process forked from a pre-imported server, not a fresh interpreter.

A fresh interpreter spends ~6 s here importing torch, torch._dynamo, diffusers, transformers and
peft before the CLI does anything; the suite starts about a hundred of them. This is Python's own
forkserver (multiprocessing) with those modules preloaded: the server imports them once and runs no
torch op (no OpenMP pool, one thread), so a fork of it is as clean as a fresh start. Each child is a
separate OS process: it takes the test's environment, working directory and argv, runs
`gentrain/__main__.py` as `python -m gentrain` would, with stdout and stderr in files, and exits
with the CLI's status after the atexit handlers a fresh interpreter runs.

Only calls with the default environment come here (variables such as OMP_NUM_THREADS or
DS_ACCELERATOR act at import time, so a call that sets them gets a fresh interpreter), and
GENTRAIN_TEST_FRESH=1 sends every call to a fresh interpreter, to check that both agree.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import tempfile
from pathlib import Path

PRELOAD = ["cli_fork_preload"]
_CTX = None


def _preloaded(_: object) -> None:
    import sys

    sys.exit(0 if "gentrain.train.loop" in sys.modules else 1)


def _context():
    """The fork server, started once with this folder on its path (Python 3.11's server ignores the
    parent's sys.path, and drops a preload that fails to import): checked to hold the libraries."""
    global _CTX
    if _CTX is None:
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved]))
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        probe = ctx.Process(target=_preloaded, args=(None,))
        probe.start()
        probe.join(60)
        if probe.exitcode != 0:
            raise RuntimeError("the test CLI fork server did not import its preload (tests/cli_fork_preload.py); "
                               "run `python -c 'import cli_fork_preload'` in tests/ to see why")
        _CTX = ctx
    return _CTX


def _child(args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    import atexit
    import runpy
    import sys

    from cli_fork_preload import SET_AT_IMPORT

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for key, value in SET_AT_IMPORT.items():
        os.environ.setdefault(key, value)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["gentrain", *args]
    try:
        runpy.run_module("gentrain", run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()   # what a fresh interpreter runs at exit (multiprocessing's child skips them)


def run(args: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run the CLI in a forked child; returns what subprocess.run(capture_output=True, text=True) would."""
    with tempfile.TemporaryDirectory(prefix="gentrain-cli-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _context().Process(target=_child, args=(list(args), dict(env), str(cwd), out, err), daemon=False)
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["gentrain", *args], timeout, output=Path(out).read_text(),
                                            stderr=Path(err).read_text())
        return subprocess.CompletedProcess(["gentrain", *args], proc.exitcode, Path(out).read_text(errors="replace"),
                                           Path(err).read_text(errors="replace"))
