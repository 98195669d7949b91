"""`gentrain presets` lists every shipped preset with its family, data and purpose; `gentrain --help`
names every command; `gentrain train --help` points at `gentrain presets` instead of listing them.
All in-process (gentrain.launch.cli.main): no training, a second at most."""
import pytest

from gentrain.launch.cli import main
from gentrain.config import PRESET_DIR, _read_yaml, list_presets
from gentrain.launch.preset_catalog import first_sentence, leading_comment


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # --help exits through argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_presets_lists_every_preset_with_family_data_and_purpose(capsys):
    rc, out, _ = run(capsys, "presets")
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert sorted(rows) == list_presets() and len(rows) == len(list(PRESET_DIR.glob("*.yaml")))
    for name, line in rows.items():
        cfg = _read_yaml(PRESET_DIR / f"{name}.yaml")
        name_, family = line.split()[:2]
        assert family == cfg["model"]["family"], line
        data = cfg["data"]
        where = data["toy2d"] if data.get("source") == "toy2d" else data["shards"]
        assert str(where) in line, (line, where)
        purpose = first_sentence(leading_comment((PRESET_DIR / f"{name}.yaml").read_text()))
        assert len(purpose) >= 15 and line.rstrip().endswith(purpose), (name, purpose)


def test_presets_filter_by_family(capsys):
    rc, out, _ = run(capsys, "presets", "--family", "cyclegan")
    assert rc == 0 and [line.split()[0] for line in out.splitlines()] == ["cyclegan_digits_inverted"]
    rc, _, err = run(capsys, "presets", "--family", "nope")
    assert rc == 2 and err.count("\n") == 1 and "'nope'" in err and "families: " in err and "gan" in err


def test_first_sentence_of_a_leading_comment():
    text = ("# WGAN (Arjovsky et al. 2017): critic weights clipped to [-0.01, 0.01] after every critic step,\n"
            "# RMSProp 5e-5, 5 critic steps per generator step (the paper's defaults; e.g. more).\n"
            "#   gentrain train wgan_toy2d\nmodel:\n  family: gan\n")
    assert leading_comment(text).endswith("(the paper's defaults; e.g. more).")
    assert first_sentence(leading_comment(text)) == ("WGAN (Arjovsky et al. 2017): critic weights clipped to "
                                                     "[-0.01, 0.01] after every critic step, RMSProp 5e-5")
    assert first_sentence("DDPM on 2-D toy data: epsilon prediction. More.") == "DDPM on 2-D toy data: epsilon prediction"
    assert leading_comment("model:\n  family: flow\n# late comment\n") == ""


def test_help_names_every_command(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for cmd in ("train", "sample", "export", "eval", "plan", "data build", "data index", "data cache", "demo",
                "presets"):
        assert f"gentrain {cmd}" in out, cmd


@pytest.mark.parametrize("sub", ["train", "sample", "export", "eval", "plan", "data", "demo", "presets"])
def test_every_subcommand_has_help(capsys, sub):
    rc, out, _ = run(capsys, sub, "--help")
    assert rc == 0 and f"usage: gentrain {sub}" in out


def test_train_help_points_at_presets_instead_of_listing_them(capsys):
    rc, out, _ = run(capsys, "train", "--help")
    assert rc == 0 and "gentrain presets" in out
    assert sum(name in out for name in list_presets()) <= 2, "train --help lists the presets again"
