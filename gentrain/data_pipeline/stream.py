"""The contract between the data pipeline and the Trainer.

The Trainer reads batches from a :class:`BatchStream`: an endless iterator (epochs follow one
another) whose position is counted on the *consuming* side, i.e. what the training process has
taken, not what workers have prefetched. ``state_dict()`` is JSON-serialisable and per rank;
``load_state_dict()`` before ``iter()`` makes the stream continue exactly after that position.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

Batch = dict[str, Any]  # tensors (B, ...) and lists of str (captions), by key


@runtime_checkable
class BatchStream(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def stats(self) -> dict[str, float]:
        """Counters for the run's metrics (e.g. ``bad/corrupt_image``, ``epoch``)."""
        ...


def check_position(state: dict[str, Any], want: dict[str, Any], what: str, hint: str) -> None:
    """A saved position must come from a stream with the same identity (`want`'s keys): else one
    line naming each difference."""
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
        from gentrain.errors import GentrainError

        found = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise GentrainError(f"the saved data position does not fit this {what} ({found}); {hint}")
