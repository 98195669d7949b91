"""The gan family in the loop: phase isolation, per-phase optimizers, WGAN clipping and critic
bursts, config refusals, bitwise resume of both nets, export round trip in a fresh process."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ok, run_cli, train_here
from gentrain.errors import GentrainError
from gentrain.config import load_config

TINY = ["model.hidden=32", "model.depth=2", "train.batch_size=64", "train.log_every=1", "train.sample_every=0",
        "train.checkpoint_every=0", "train.progress_bar=false", "run.trackers=[]", "eval.num_samples=500"]


def trainer(tmp_path, preset, *extra):
    from gentrain.train.loop import Trainer

    cfg = load_config(preset, [*TINY, "data.toy2d=8gaussians", f"run.output_dir={tmp_path}", *extra])
    return Trainer(cfg, tmp_path / "run")


def snap(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def same(a, net):
    return all(torch.equal(a[k], v) for k, v in net.state_dict().items())


def opt_state(opt):
    return {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for i, s in enumerate(opt.state.values())}


@pytest.mark.parametrize("preset", ["gan_toy2d", "wgan_gp_toy2d"])
def test_each_phase_updates_only_its_own_net_and_optimizer(tmp_path, preset, fresh_accelerate_state):
    tr = trainer(tmp_path, preset)
    assert [p.name for p in tr.phases] == ["disc", "gen"]
    nets, (d_opt, g_opt) = tr.objective.nets, tr.backend.optimizers
    it = iter(tr.stream)
    g0, d0 = snap(nets["gen"]), snap(nets["disc"])
    tr._run_phase(0, it)                                        # a critic step
    assert not same(d0, nets["disc"]) and same(g0, nets["gen"])
    assert not g_opt.state and all(p.grad is None for p in nets["gen"].parameters())  # no backward through G
    g1, d1, d_state = snap(nets["gen"]), snap(nets["disc"]), opt_state(d_opt)
    tr._run_phase(1, it)                                        # a generator step through D
    assert not same(g1, nets["gen"]) and same(d1, nets["disc"])
    after = opt_state(d_opt)
    assert all(torch.equal(d_state[i][k], after[i][k]) for i in d_state for k in d_state[i])
    assert all(p.requires_grad for p in nets["disc"].parameters())  # unfrozen again after the phase


def test_paper_optimizers_are_filled_into_the_config():
    wgan = load_config("wgan_toy2d").model
    assert (wgan.d_optimizer.name, wgan.d_optimizer.lr, wgan.n_critic, wgan.clip_value) == ("rmsprop", 5e-5, 5, 0.01)
    gp = load_config("wgan_gp_toy2d", ["model.g_optimizer.lr=null", "model.gp_lambda=10"]).model
    assert (gp.g_optimizer.name, gp.g_optimizer.lr, gp.g_optimizer.betas, gp.n_critic) == ("adam", 1e-4, [0.0, 0.9], 5)
    assert gp.d_norm == "none"
    toy = load_config("wgan_gp_toy2d").model   # the preset's own lr and the released toy code's lambda
    assert (toy.g_optimizer.lr, toy.d_optimizer.lr, toy.d_optimizer.betas, toy.gp_lambda) == (1e-3, 1e-3, [0.0, 0.9], 0.1)
    dc = load_config("gan_toy2d").model
    assert (dc.d_optimizer.name, dc.d_optimizer.lr, dc.d_optimizer.betas, dc.n_critic) == ("adam", 2e-4, [0.5, 0.999], 1)
    sg = load_config("stylegan_digits").model   # StyleGAN's Adam for both nets
    assert [(o.name, o.lr, o.betas) for o in (sg.g_optimizer, sg.d_optimizer)] == [("adam", 1e-3, [0.0, 0.99])] * 2
    custom = load_config("gan_toy2d", ["model.g_optimizer.name=rmsprop", "model.g_optimizer.lr=1e-3"]).model
    assert (custom.g_optimizer.name, custom.g_optimizer.lr, custom.g_optimizer.betas) == ("rmsprop", 1e-3, None)


def test_built_optimizers_follow_the_phases(tmp_path, fresh_accelerate_state):
    tr = trainer(tmp_path, "wgan_toy2d")
    d_opt, g_opt = (getattr(o, "optimizer", o) for o in tr.backend.optimizers)  # inside accelerate's wrapper
    assert isinstance(d_opt, torch.optim.RMSprop) and isinstance(g_opt, torch.optim.RMSprop)
    assert d_opt.param_groups[0]["lr"] == 5e-5
    tr = trainer(tmp_path / "b", "gan_toy2d", "model.d_optimizer.betas=[0.0,0.99]")
    d_opt, g_opt = (getattr(o, "optimizer", o) for o in tr.backend.optimizers)
    assert type(d_opt) is torch.optim.Adam and d_opt.param_groups[0]["betas"] == (0.0, 0.99)
    assert g_opt.param_groups[0]["betas"] == (0.5, 0.999)


@pytest.mark.parametrize("overrides, message", [
    (["model.loss=wgan_gp", "model.net=dcgan", "data.source=shards", "data.shards=x", "model.d_norm=batch"], "BatchNorm"),
    (["model.r1_gamma=1", "model.net=dcgan", "data.source=shards", "data.shards=x", "model.d_norm=batch"], "BatchNorm"),
    (["model.loss=ls"], "model.loss"),
    (["model.net=dcgan"], "does not fit"),
    (["model.condition=class"], "carry no labels"),
    (["model.critic_burst=true"], "critic_burst"),
    (["model.d_optimizer.name=sgd"], "d_optimizer.name"),
    (["model.pac=0"], "model.pac"),
    (["model.pac=3"], "multiple of pac=3"),
    (["model.pac=2", "model.net=dcgan", "data.source=shards", "data.shards=x", "model.condition=class"], "unconditional"),
])
def test_bad_gan_configs_are_refused_in_one_line(overrides, message):
    with pytest.raises(GentrainError, match=message) as e:
        load_config("gan_toy2d", overrides)
    assert "\n" not in str(e.value)


def test_pacgan_critic_judges_packed_groups_of_samples(tmp_path, fresh_accelerate_state):
    tr = trainer(tmp_path, "wgan_gp_toy2d", "model.pac=4")
    obj = tr.objective
    x = torch.arange(64 * 2, dtype=torch.float32).view(64, 2)
    packed = obj.pack(x)
    assert packed.shape == (16, 8) and torch.equal(packed[1], torch.cat(list(x[4:8])))  # samples 4..7 side by side
    img = torch.randn(8, 3, 4, 4)
    assert obj.pack(img).shape == (2, 12, 4, 4) and torch.equal(obj.pack(img)[1, 3:6], img[5])  # channels of sample 5
    seen = []
    hook = obj.nets["disc"].register_forward_hook(lambda m, i, o: seen.append((i[0].shape, o.shape)))
    loss, logs = obj.loss("disc", next(iter(tr.stream)))
    hook.remove()
    assert torch.isfinite(loss) and "gan/gradient_penalty" in logs
    assert seen and all(i == (16, 8) and o[0] == 16 for i, o in seen)  # real, fake and the penalty's interpolates


def test_wgan_clips_after_every_critic_step_and_bursts(tmp_path, fresh_accelerate_state):
    tr = trainer(tmp_path, "wgan_toy2d", "train.max_steps=3", "model.d_optimizer.lr=0.05")
    obj, c = tr.objective, tr.cfg.model.clip_value
    seen = []
    real_after = obj.after_step

    def check(phase):
        real_after(phase)
        if phase == "disc":
            seen.append(max(p.abs().max().item() for p in obj.nets["disc"].parameters()))
    obj.after_step = check
    tr.train()
    assert len(seen) == 3 * 5 and max(seen) <= c  # 5 critic steps per generator step, each clipped
    disc = next(p for p in tr.phases if p.name == "disc")
    burst = trainer(tmp_path / "b", "wgan_toy2d", "model.critic_burst=true").objective
    assert [burst.repeats(disc, s) for s in (0, 24, 25, 499, 500, 501)] == [100, 100, 5, 5, 100, 5]


@pytest.mark.slow
def test_two_network_run_resumes_bitwise_and_exports(tmp_path):
    args = ["train", "wgan_gp_toy2d", *TINY, "data.toy2d=8gaussians", "train.max_steps=8", "train.ema_decay=0.9",
            "train.lr_schedule=cosine", "train.warmup_steps=2", f"run.output_dir={tmp_path}"]
    assert run_cli(*args, "run.name=straight").returncode == 0
    r = run_cli(*args, "run.name=split", "--stop-at", "4")
    ok(r)
    r = run_cli(*args, "run.name=split", "--resume", "auto")
    ok(r)
    a, b = (tmp_path / n / "checkpoints" / "step_8" for n in ("straight", "split"))
    for f in ("model.safetensors", "model_1.safetensors", "ema_gen.safetensors", "optimizer.bin", "optimizer_1.bin"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    out = tmp_path / "export"
    r = run_cli("export", str(tmp_path / "straight"), "--out", str(out))
    ok(r)
    meta = json.loads((out / "gentrain_export.json").read_text())
    assert meta["weights"] == "ema" and (out / "generator" / "config.json").is_file()
    code = ("import sys, torch; from gentrain.modeling.gan.mlp import MLPGenerator; "
            "g = MLPGenerator.from_pretrained(sys.argv[1]).eval(); "
            "print(g(torch.linspace(-1, 1, 6).view(3, 2)).tolist())")
    fresh = subprocess.run([sys.executable, "-c", code, str(out / "generator")], capture_output=True, text=True, timeout=120)
    ok(fresh)
    from gentrain.train.runs import load_trained

    _, obj, _ = load_trained(tmp_path / "straight")
    want = obj.nets["gen"](torch.linspace(-1, 1, 6).view(3, 2)).tolist()
    assert json.loads(fresh.stdout) == want


SMOKE = {  # preset -> (sampling flags, generator class)
    "lsgan_toy2d": ([], "gentrain.modeling.gan.mlp:MLPGenerator"),
    "dcgan_digits": ([], "gentrain.modeling.gan.dcgan:DCGANGenerator"),
    "stylegan_digits": (["--truncation", "0.5"], "gentrain.modeling.gan.stylegan:StyleGenerator"),
    "cgan_text_digits": (["--prompt", "a handwritten digit 3", "--prompt", "a handwritten digit seven"],
                         "gentrain.modeling.gan.dcgan:DCGANGenerator"),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(SMOKE))
def test_preset_trains_previews_samples_and_exports(preset, digits16, tmp_path):
    flags, cls = SMOKE[preset]
    data = [] if preset.endswith("toy2d") else [f"data.shards={digits16 / 'train'}", f"eval.shards={digits16 / 'test'}",
                                                 "model.base_channels=8", "model.d_base_channels=8", "eval.fd_seeds=1",
                                                 "eval.num_samples=50"]
    train_here(preset, tmp_path, "s", *TINY[2:], *data, "train.batch_size=16", "train.max_steps=2",
               "train.sample_every=2", "train.checkpoint_every=2")   # in this process; the CLI below reads its run
    run = tmp_path / "s"
    assert (run / "samples" / "step_2.png").is_file() and (run / "checkpoints" / "step_2" / "ema_gen.safetensors").is_file()
    r = run_cli("sample", str(run), "-n", "4", *flags, "--out", str(tmp_path / "x.png"))
    ok(r)
    assert json.loads(r.stdout)["shape"][0] == 4
    if preset == "stylegan_digits":   # an unconditional model refuses labels in one line
        r = run_cli("sample", str(run), "-n", "4", "--label", "1", "--out", str(tmp_path / "y.png"))
        assert r.returncode != 0 and "unconditional" in r.stderr
    out = tmp_path / "export"
    r = run_cli("export", str(run), "--out", str(out))
    ok(r)
    module, name = cls.split(":")
    code = (f"import sys; from {module} import {name}; g = {name}.from_pretrained(sys.argv[1]); "
            "print(sum(p.numel() for p in g.parameters()))")
    fresh = subprocess.run([sys.executable, "-c", code, str(out / "generator")], capture_output=True, text=True, timeout=120)
    ok(fresh)
    from gentrain.train.runs import load_trained

    _, obj, _ = load_trained(run)
    assert int(fresh.stdout) == sum(p.numel() for p in obj.nets["gen"].parameters())
    if preset == "cgan_text_digits":
        assert (out / "text_encoder" / "config.json").is_file() and (out / "tokenizer").is_dir()
