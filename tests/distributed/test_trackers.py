"""The preview grid reaches TensorBoard through distributed/trackers.py (the loop never handles a tracker)."""
from types import SimpleNamespace

import pytest

from PIL import Image

from gentrain.distributed.trackers import JSONLTracker, log_image


def test_log_image_writes_the_grid_to_tensorboard_and_skips_other_trackers(tmp_path):
    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardTracker("gentrain", tmp_path)
    tb.start()   # what accelerate.init_trackers does
    acc = SimpleNamespace(trackers=[JSONLTracker(tmp_path), tb])
    log_image(acc, "samples", Image.new("L", (6, 4), 200), step=7)
    tb.finish()
    events = EventAccumulator(str(tmp_path / "gentrain"))
    events.Reload()
    assert events.Tags()["images"] == ["samples"]
    (img,) = events.Images("samples")
    assert (img.step, img.width, img.height) == (7, 6, 4)
    assert not (tmp_path / "metrics.jsonl").exists()   # the JSONL tracker took nothing


def test_log_image_without_tensorboard_does_nothing(tmp_path):
    log_image(SimpleNamespace(trackers=[]), "samples", Image.new("RGB", (2, 2)), step=1)
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_rows_are_not_flushed_at_every_log_but_reach_the_file(tmp_path):
    """accelerate's tracker flushes the event file after every log (it waits for the writer's
    thread, ~1 ms a row); gentrain's leaves that to the writer's flush_secs, flush_trackers
    (when the loop leaves) and finish, and writes the same rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gentrain.distributed.trackers import TensorBoardTracker, flush_trackers

    tb = TensorBoardTracker(tmp_path)
    tb.start()
    flushes = []
    real_flush = tb.writer.flush
    tb.writer.flush = lambda: (flushes.append(1), real_flush())
    for step in range(1, 4):
        tb.log({"loss/flow": 0.5 / step, "lr/flow": 1e-3, "note": f"row {step}"}, step=step)
    assert flushes == []
    flush_trackers(SimpleNamespace(trackers=[JSONLTracker(tmp_path), tb]))
    assert flushes == [1]
    events = EventAccumulator(str(tmp_path / "gentrain"))
    events.Reload()
    rows = events.Scalars("loss/flow")
    assert [e.step for e in rows] == [1, 2, 3]
    assert [e.value for e in rows] == pytest.approx([0.5, 0.25, 0.5 / 3])   # stored as float32
    assert [e.step for e in events.Scalars("lr/flow")] == [1, 2, 3]
    tb.finish()


def test_the_accelerator_gets_gentrains_tensorboard_tracker(tmp_path):
    from gentrain.distributed.trackers import TensorBoardTracker, make_trackers

    made = make_trackers(["tensorboard"], tmp_path)
    assert [type(t) for t in made] == [TensorBoardTracker, JSONLTracker]
    assert made[0].name == "tensorboard"   # log_image and acc.get_tracker find it by that name
