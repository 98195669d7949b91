"""The preview grid reaches TensorBoard through distributed/trackers.py (the loop never handles a tracker)."""
from types import SimpleNamespace

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
