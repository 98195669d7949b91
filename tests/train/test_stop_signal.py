"""Stop on SIGUSR1/SIGTERM, in process: the step finishes, a checkpoint is saved, one line is printed,
`gentrain train` exits 75 and `--resume auto` continues. (Multi-process: tests/launches/test_slurm.py.)"""
import json
import os
import signal
import threading
import time

import pytest
import torch
from torch import nn

from gentrain.launch.cli import main
from gentrain.config import load_config
from gentrain import checkpoint as ckpt
from gentrain.train.loop import Trainer
from gentrain.objectives import Objective
from gentrain.train.stop import EXIT_STOPPED, StopSignals


def test_the_first_signal_is_recorded_and_the_handlers_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    stop = StopSignals()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
        time.sleep(0.01)
    finally:
        stop.restore()
    assert stop.received == signal.SIGUSR1
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


class SignalsItself(Objective):
    """A linear net on 2-D points that sends `signum` to its own process during step `at`."""
    data_key = "x"

    def __init__(self, signum, at):
        self.nets = {"net": nn.Linear(2, 2)}
        self.signum, self.at = signum, at

    def loss(self, phase, batch):
        if self.step + 1 == self.at:
            os.kill(os.getpid(), self.signum)
        return (self.nets["net"](batch["x"]) ** 2).mean(), {}

    def sample(self, n, cond=None, *, generator=None, **kw):
        return torch.randn(n, 2, generator=generator)


def small_cfg(tmp_path):
    return load_config("flow_toy2d", ["train.progress_bar=false", "train.sample_every=0", "train.checkpoint_every=0",
                                      "train.max_steps=6", "train.log_every=1", "eval.num_samples=100",
                                      "train.batch_size=32", f"run.output_dir={tmp_path}", "run.trackers=[]"])


@pytest.mark.parametrize("signum, at", [(signal.SIGTERM, 3), (signal.SIGUSR1, 6)])
def test_a_signal_finishes_the_step_saves_and_resume_continues(tmp_path, capsys, signum, at,
                                                               fresh_accelerate_state):
    run = tmp_path / "run"
    handler_before = signal.getsignal(signum)
    trainer = Trainer(small_cfg(tmp_path), run, objective=SignalsItself(signum, at))
    results = trainer.train()
    assert results["step"] == at and results["stopped_by_signal"] == signum
    path = run / "checkpoints" / f"step_{at}"
    assert ckpt.check_checkpoint(path) is None
    assert (f"gentrain: stopped by signal {signal.Signals(signum).name} at step {at}; checkpoint saved: {path}; "
            f"continue with --resume auto") in capsys.readouterr().err
    assert not (run / "eval.json").exists()  # even at max_steps: the stop exit, the resume evaluates
    assert signal.getsignal(signum) is handler_before

    reset_accelerate_state()  # a second Trainer in this process: the resumed run
    again = Trainer(small_cfg(tmp_path), run, resume_from=path, objective=SignalsItself(signum, at=0))
    assert again.step == at
    assert again.train()["step"] == 6 and ckpt.load_json(run / "eval.json")["step"] == 6


def reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_gentrain_train_exits_75_on_sigusr1(tmp_path, capsys, fresh_accelerate_state):
    metrics = tmp_path / "s" / "metrics.jsonl"

    def signal_once_training():
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=signal_once_training, daemon=True).start()
    rc = main(["train", "flow_toy2d", "train.max_steps=3000", "train.log_every=1", "train.progress_bar=false",
               "train.batch_size=64", "eval.num_samples=100", f"run.output_dir={tmp_path}", "run.name=s"])
    out, err = capsys.readouterr()
    assert rc == EXIT_STOPPED == 75
    step = json.loads(out)["step"]
    assert 1 <= step < 3000
    assert f"gentrain: stopped by signal SIGUSR1 at step {step}; checkpoint saved: " in err
    assert ckpt.find_resume_checkpoint(tmp_path / "s" / "checkpoints").name == f"step_{step}"
