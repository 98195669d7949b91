"""What the fork server imports once (see cli_fork.py): the libraries every `gentrain` command
loads. Importing them runs no torch op, so the server stays single-threaded and safe to fork.
SET_AT_IMPORT keeps what the imports put into os.environ (gentrain sets DS_ACCELERATOR=cpu on a
machine without CUDA): a child takes the test's environment and then these, as a fresh process would."""
import os
import sys

_before = dict(os.environ)

import accelerate  # noqa: E402,F401
import diffusers.training_utils  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import gentrain.launch.cli  # noqa: E402,F401
import gentrain.train.loop  # noqa: E402,F401

SET_AT_IMPORT = {k: v for k, v in os.environ.items() if k not in _before}
sys.stdout.flush()
sys.stderr.flush()
