"""The process entry point: `gentrain`, `python -m gentrain` and `accelerate launch -m gentrain`."""
from __future__ import annotations

import atexit
import os
import sys

from gentrain.launch.cli import main


def run() -> None:
    """main(), then Python's exit handlers (loader workers joined, logs flushed, temp files
    removed), then the exit status without the interpreter's teardown. That teardown can abort a
    finished process ("terminate called without an active exception", SIGABRT, after the last line
    was printed: a native thread destroyed while joinable), which torchrun reports as a failed run;
    seen twice on this kind of machine, in a ZeRO-3 and a DDP launch. An exception still ends the
    process the usual way (traceback, status 1)."""
    rc = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc or 0))
