"""Typed configs: presets, overrides, validation errors naming key/value/allowed, CLI one-liners."""
import pytest

from gentrain.errors import GentrainError
from gentrain.config import list_presets, load_config, to_yaml

from conftest import run_cli


def test_preset_by_name_and_overrides():
    cfg = load_config("flow_toy2d", ["train.lr=3e-4", "data.toy2d=moons", "train.betas=[0.5,0.9]"])
    assert cfg.model.family == "flow" and cfg.run.name == "flow_toy2d"
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.data.toy2d == "moons" and cfg.train.betas == [0.5, 0.9]
    assert "flow_toy2d" in list_presets()


def test_path_config_and_roundtrip(tmp_path):
    cfg = load_config("flow_toy2d", ["train.max_steps=7"])
    p = tmp_path / "mine.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(str(p))
    assert to_yaml(again).replace("name: mine", "name: flow_toy2d") == to_yaml(cfg)
    assert again.run.name == "flow_toy2d"  # run.name saved in the file wins over the file's stem


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "config key 'train.lrr' is not a known key"),
    ("train.lr=abc", "config key 'train.lr'"),
    ("train.max_steps=1.5", "config key 'train.max_steps'"),
    ("model.sampler=rk4", "config key 'model.sampler': 'rk4' is not allowed; choose one of euler, heun"),
    ("train.mixed_precision=fp16", "'fp16' needs a CUDA GPU"),
    ("train.mixed_precision=fp8", "choose one of no, bf16, fp16"),
    ("foo.bar=1", "config key 'foo' is not a known section"),
    ("model.family=gann", "'gann' is not a known family"),
    ("train.lr=-1", "config key 'train.lr': -1"),
    ("train.lr=.nan", "must be a finite number"),
    ("train.ema_decay=1.5", "config key 'train.ema_decay'"),
    ("data.source=shards", "'data.shards' is required"),
    ("data.shards=pipe:cat x.tar", "set data.allow_pipe=true"),
    ("run.name=a/b", "config key 'run.name'"),
    ("trainmax_steps", "expected key=value"),
    ("train.ddp_comm_hook=power_sgd", "config key 'train.ddp_comm_hook': 'power_sgd' is not allowed; choose one of no, fp16, bf16"),
    ("train.ddp_bucket_mb=0", "config key 'train.ddp_bucket_mb'"),
    ("train.ddp_comm_hook=bf16", "config key 'train.ddp_comm_hook': 'bf16' needs a CUDA GPU"),
])
def test_invalid_config_names_key_and_value(override, needle):
    with pytest.raises(GentrainError) as e:
        load_config("flow_toy2d", [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_fp16_allowed_where_cuda_exists():
    from gentrain.config import validate

    cfg = load_config("flow_toy2d")
    cfg.train.mixed_precision = "fp16"
    validate(cfg, cuda_available=True)
    with pytest.raises(GentrainError):
        validate(cfg, cuda_available=False)


def test_ddp_all_reduce_options_reach_accelerate_and_are_refused_under_deepspeed():
    from accelerate.utils import DDPCommunicationHookType

    from gentrain.distributed.core import ddp_handlers

    t = load_config("flow_toy2d", ["train.ddp_bucket_mb=50", "train.ddp_bucket_view=true",
                                   "train.ddp_comm_hook=fp16"]).train
    (h,) = ddp_handlers(t, use_ds=False)
    assert (h.bucket_cap_mb, h.gradient_as_bucket_view, h.comm_hook) == (50, True, DDPCommunicationHookType.FP16)
    with pytest.raises(GentrainError, match="config key 'train.ddp_bucket_mb' sets DDP's gradient all-reduce"):
        ddp_handlers(t, use_ds=True)
    assert ddp_handlers(load_config("flow_toy2d").train, use_ds=True) == []


def test_missing_required_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden: 3\ntrain:\n  max_steps: 10\n")
    with pytest.raises(GentrainError, match="'model.family' is missing"):
        load_config(str(p))
    p.write_text("model: {family: flow}\ndata: {source: shards}\n")
    with pytest.raises(GentrainError, match="'data.shards' is required"):
        load_config(str(p))


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  family: flow\n   hidden: [1, 2\n")
    cases = [
        (["train", str(tmp_path / "nope.yaml")], "does not exist"),
        (["train", str(bad_yaml)], "malformed YAML"),
        (["train", "no_such_preset"], "no preset named 'no_such_preset'"),
        (["train", "flow_toy2d", "train.lrr=1"], "'train.lrr' is not a known key"),
        (["train", "flow_toy2d", "train.batch_size=big"], "config key 'train.batch_size'"),
    ]
    for args, needle in cases:
        r = run_cli(*args, f"run.output_dir={tmp_path / 'runs'}", timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.startswith("gentrain: error:")]
        assert len(lines) == 1 and needle in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_dry_run_prints_resolved_config_and_writes_nothing(tmp_path):
    r = run_cli("train", "flow_toy2d", "train.lr=0.01", f"run.output_dir={tmp_path}", "--dry-run", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "lr: 0.01" in r.stdout and "family: flow" in r.stdout and "max_grad_norm" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_every_subcommand_has_help():
    for sub in ("train", "sample", "export", "eval", "data", "demo"):
        r = run_cli(sub, "--help", timeout=120)
        assert r.returncode == 0 and "usage: gentrain " + sub in r.stdout, (sub, r.stderr)


def test_a_bare_no_is_mixed_precision_no():
    """YAML 1.1 reads `no` as false; `train.mixed_precision=no` must still mean "no"."""
    from gentrain.config import load_config

    assert load_config("flow_toy2d", ["train.mixed_precision=no"]).train.mixed_precision == "no"
