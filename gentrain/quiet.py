"""Messages of the libraries below gentrain that gentrain knows to be harmless, silenced by
message: each filter names one logger (or warning category) and a pattern of the one message it
drops, never a whole logger, category or level. Everything else, and every message a user must
act on (torch's DataLoader worker count, deprecations gentrain's own code would hit), still shows.

`install()` runs once at the start of every `gentrain` command (launch/cli.py's main), which is also
what every process of an `accelerate launch -m gentrain ...` runs. It imports none of the
libraries: a logger's filters stay on the logger object the library later gets by name.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from typing import Iterator

# (logger name, message pattern, why it is harmless for gentrain)
LOG_FILTERS = [
    ("transformers.utils.import_utils", r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back",
     "importing diffusers' StableDiffusionPipeline names the safety checker's CLIP/Siglip image "
     "processors; gentrain loads neither (no safety checker)"),
    ("diffusers.pipelines.pipeline_utils",
     r"^Expected types for text_encoder: \(<class 'transformers\.models\.clip\.modeling_clip\.CLIPTextModel'>,\), "
     r"got <class 'transformers\.models\.bert\.modeling_bert\.BertModel'>\.$",
     "gentrain's text-to-image exports hold the packaged MiniLM (a BERT) where SD has CLIP; the "
     "pipeline runs it as it is (tested: stock loading draws what gentrain draws)"),
    ("diffusers.models.modeling_utils", r"^There are modules in \w+ that should be kept in float32: \[\]\.",
     "the list is empty: no module of that model needs float32, so casting it with .to() is exact"),
    ("diffusers.loaders.lora_base", r"^No LoRA keys associated to \w+ found with the prefix='text_encoder'",
     "a LoRA export without text-encoder adapters has no text-encoder keys, as intended"),
    ("diffusers.loaders.peft", r"^No LoRA keys associated to \w+ found with the prefix='text_encoder'",
     "as above"),
    ("DeepSpeed", r"^Setting accelerator to CPU\.",
     "printed (on stdout) when no CUDA device is visible, where gentrain trains on CPU on purpose"),
]
# (category, message pattern, why)
WARNING_FILTERS = [
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "DeepSpeed's ZeRO gathers call it (not gentrain's code); it still works on this torch"),
]
# bare print()s on stdout, dropped only inside `stdout_without` (they would corrupt the JSON there)
STDOUT_LINES = [r"^DeepSpeed \S+ built successfully$"]


class MessageFilter(logging.Filter):
    """Drops the records of one logger whose message matches a pattern."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to drop
            return True


_installed = False


def install() -> None:
    """Add the filters (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, pattern, _why in LOG_FILTERS:
        logging.getLogger(name).addFilter(MessageFilter(pattern))
    for category, pattern, _why in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


class _LineFilter(io.TextIOBase):
    """A text stream passing whole lines to `out` except those matching `pattern`."""

    def __init__(self, out, pattern: re.Pattern):
        self.out, self.pattern, self.pending = out, pattern, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.pending += s
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not self.pattern.search(line):
                self.out.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        self.out.flush()

    def close_pending(self) -> None:
        if self.pending and not self.pattern.search(self.pending):
            self.out.write(self.pending)
        self.pending = ""


@contextlib.contextmanager
def stdout_without(patterns: list[str] = STDOUT_LINES) -> Iterator[None]:
    """Within the block, stdout lines matching any of `patterns` are dropped (library print()s)."""
    out = sys.stdout
    filt = _LineFilter(out, re.compile("|".join(f"(?:{p})" for p in patterns)))
    sys.stdout = filt
    try:
        yield
    finally:
        filt.close_pending()
        sys.stdout = out
