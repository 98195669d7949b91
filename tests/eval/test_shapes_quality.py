"""bench/shapes_quality.py's report: nets ranked at equal time by their worst checker attribute,
then the best net followed over the budgets it was run for (quality against compute); and the
checker's beats() (gentrain/eval/shapes.py), which the bench and the t2i quality test share."""
import importlib.util

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("shapes_quality", REPO / "bench" / "shapes_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(net, minutes, worst, all_, steps=100):
    scores = {"colour": 0.99, "shape": 0.98, "size": 0.97, "position": worst, "count": 0.96, "all": all_, "n": 500}
    refs = {k: {a: v for a in ("colour", "shape", "size", "position", "count", "all")}
            for k, v in (("real", 1.0), ("wrong", 0.1), ("noise", 0.0))}
    return {"net": net, "minutes": minutes, "date": "2026-12-08 00:00 UTC", "steps": steps, "scores": scores,
            "references": refs, "other_jobs_share": 0.0}


def test_report_ranks_at_equal_time_by_the_worst_attribute_and_follows_the_best_net_over_budgets():
    sq = _bench()
    rows = [_row("unet", 45, 0.5, 0.45), _row("pixart", 45, 0.9, 0.8), _row("mmdit", 45, 0.7, 0.9),
            _row("pixart", 22.5, 0.6, 0.5, 50), _row("pixart", 90, 0.95, 0.9, 200), _row("unet", 90, 0.99, 0.99)]
    out = sq.report(rows, None)
    at45 = out[out.index("45 min each"):out.index("90 min each")]
    # pixart (worst 0.9) > mmdit (0.7, though its `all` is higher) > unet (0.5)
    assert [line.split()[1] for line in at45.splitlines() if line[:2] in ("1.", "2.", "3.")] == ["pixart", "mmdit", "unet"]
    assert "real" in at45 and "noise" in at45
    # the budget with the most nets (45 min, three) is the one ranked; its best followed over every budget
    curve = out[out.index("quality against compute: pixart (best at 45 min)"):]
    assert [line.split()[0] for line in curve.splitlines()[2:5]] == ["22.5", "45", "90"]
    assert "limiting attribute at 90 min: position (0.950" in curve
    # ties on the worst attribute and `all` (both 0 early in training) go to the higher mean of the five
    tied = [_row("unet", 2, 0.0, 0.0), {**_row("pixart", 2, 0.0, 0.0)}]
    tied[1]["scores"] = {**tied[1]["scores"], "colour": 1.0}
    assert sq.report(tied, 2).splitlines()[3].split()[:2] == ["1.", "pixart"]


def test_beats_names_every_attribute_not_won_by_the_margin():
    from gentrain.eval.shapes import ATTRIBUTES, beats

    base = {"colour": 0.1, "shape": 0.0, "size": 0.0, "position": 0.0, "count": 0.2}
    assert beats(base, base, margin=0.0) == list(ATTRIBUTES)   # equal never beats
    better = {**base, "colour": 0.5, "shape": 0.3, "size": 0.3, "position": 0.2, "count": 0.35}
    assert beats(better, base, margin=0.1) == []
    assert beats(better, base, margin=0.16) == ["count"]
