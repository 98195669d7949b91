"""Which of a run's evaluators apply to its data, told before training starts.

Two evaluators score against a data source of their own, not against the run's data: the digits
evaluator (eval.digits: a classifier and real set from scikit-learn's digits) and the shapes checker
(eval.shapes: it draws its own procedural prompts and checks the scenes). On any other data their
figures mean nothing, and they cost minutes of sampling. A shard set's source is the one
`gentrain data build --source ...` recorded in its index.json (a cached set, "cache:SPEC", is
followed to the set it was cached from). An evaluator whose source is not the run's is skipped,
with one line saying why, at the start of the run and at `gentrain eval`.
"""
from __future__ import annotations

import dataclasses
import json
import posixpath
import sys
from typing import Any, Optional

from gentrain.errors import DataError, GentrainError

# eval key -> (the `data build --source` values it applies to, what it scores against)
OWN_DATA = {
    "digits": (("digits", "edges2digits", "digits_inverted"),
               "the digits evaluator compares with scikit-learn's digits (its classifier and real set)"),
    "shapes": (("shapes",), "the shapes checker scores its own procedural prompts (coloured shapes)"),
}
DOC = "docs/common-errors.md, 'Evaluation of your own data'"


def shard_source(spec: str, *, s3_endpoint_url: Optional[str] = None, depth: int = 0) -> Optional[str]:
    """The source recorded in the index.json of the folder(s) a shard spec reads (a folder, a brace
    pattern or a list), "cache:SPEC" followed to SPEC's own; None when no index records one, or
    the folders' indexes disagree."""
    from gentrain.data_pipeline.storage import expand_urls, is_dir, join, read_text

    if not spec or spec.startswith("pipe:") or ",pipe:" in spec:
        return None
    folders = [spec] if is_dir(spec) else sorted({posixpath.dirname(u) or "." for u in expand_urls(spec)})
    sources = set()
    for folder in folders:
        try:
            text = read_text(join(folder, "index.json"), s3_endpoint_url)
            source = json.loads(text).get("source") if text else None
        except (DataError, ValueError, AttributeError):
            source = None
        if isinstance(source, str) and source.startswith("cache:") and depth < 4:
            source = shard_source(source[len("cache:"):], s3_endpoint_url=s3_endpoint_url, depth=depth + 1)
        sources.add(source if isinstance(source, str) else None)
    return sources.pop() if len(sources) == 1 else None


def skipped_evaluators(cfg: Any) -> dict[str, str]:
    """{eval key: the line saying why it is skipped} for each evaluator turned on that does not
    apply to the run's shards (data.shards or every data.datasets entry, and eval.shards)."""
    from gentrain.data_pipeline.config import shard_specs

    on = [k for k in OWN_DATA if getattr(cfg.eval, k, False)]
    if not on or cfg.data.source != "shards":
        return {}
    specs = [("data.shards" if not cfg.data.datasets else f"data.datasets[{i}].shards", s)
             for i, s in enumerate(shard_specs(cfg.data))]
    if cfg.eval.shards:
        specs.append(("eval.shards", cfg.eval.shards))
    found = [(key, spec, shard_source(spec, s3_endpoint_url=cfg.data.s3_endpoint_url)) for key, spec in specs]
    out = {}
    for k in on:
        allowed, what = OWN_DATA[k]
        wrong = [(key, spec, src) for key, spec, src in found if src not in allowed]
        if wrong:
            key, spec, src = wrong[0]
            held = f"was built from {src!r}" if src else "has no index.json that records its source"
            out[k] = (f"gentrain: eval.{k} skipped: {what} and applies only to shards built by `gentrain data build "
                      f"--source {'|'.join(allowed)}`; {key} {spec} {held} (see {DOC})")
    return out


_said: set[str] = set()


def scoped(cfg: Any, *, say: bool = True) -> Any:
    """cfg with the evaluators that do not apply to its data turned off; with `say`, one line on
    stderr for each (once a process)."""
    skip = skipped_evaluators(cfg)
    for line in skip.values():
        if say and line not in _said:
            _said.add(line)
            print(line, file=sys.stderr)
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **{k: False for k in skip})) if skip else cfg


def check_eval_data(cfg: Any, *, say: bool) -> None:
    """Before step 1: the held-out shards the end of the run reads are found now rather than after
    training, and each evaluator that does not apply to the data says so (:func:`scoped`)."""
    d, shards = cfg.data, cfg.eval.shards
    if shards and d.source == "shards":
        from gentrain.data_pipeline.shardlist import resolve_shards

        try:
            found = resolve_shards(shards, allow_pipe=d.allow_pipe, s3_endpoint_url=d.s3_endpoint_url)
        except GentrainError as e:
            raise GentrainError(f"config key 'eval.shards': {e}") from None
        if found.total == 0:
            raise GentrainError(f"config key 'eval.shards': {shards!r} holds no samples")
    scoped(cfg, say=say)
