"""What the config says after pruning, checked the way a user relies on it, per model type.

Every type of tests/hf_models.SAMPLE (built small from its default config, random init) is
compiled with ``Plan(ratio=0.5)`` at each granularity it has, with the default
``config="expressible"``. Printed per case: whether the config states the pruned model (then
``save_pretrained`` -> ``from_pretrained`` from files is run and the largest output
difference printed: the claim holds at atol 1e-5), or the default refuses (nothing the config
can state; ``config="free"`` then prunes it and the report names the field), or it compiles
and the report says why the config cannot state it. No timing: see transformers.py.

    .venv/bin/python benchmarks/config_claims.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import graphprune as gp
from graphprune.io import write_text_atomic

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
# this folder holds a transformers.py (a benchmark): off the path, so the library is found;
# the project root on it, for tests.hf_models
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))


def _outputs(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    from tests.equivalence import outputs

    return outputs(model, x)


def case(model_type: str, head: str, granularity: str) -> dict[str, Any]:
    from tests import hf_models

    model = hf_models.build(model_type, head)
    x = hf_models.example_inputs(model)
    row: dict[str, Any] = {"type": model_type, "granularity": granularity}
    plan = gp.Plan(ratio=0.5, granularity=granularity)
    try:
        pruned = gp.compile(model, plan, x)
    except gp.PruneError as exc:
        row["outcome"] = "refused"
        row["why"] = next(
            (line.split(": ", 1)[1] for line in str(exc).splitlines() if "config: " in line),
            str(exc).splitlines()[0],
        )
        pruned = gp.compile(model, gp.Plan(ratio=0.5, granularity=granularity, config="free"), x)
        row["free_expressible"] = gp.report(pruned).config["expressible"]
        return row
    report = gp.report(pruned)
    row["params"] = (report.params_before, report.params_after)
    row["changes"] = report.config["changes"]
    if not report.config["expressible"]:
        row["outcome"] = "reported"
        row["why"] = report.config["reason"]
        return row
    with tempfile.TemporaryDirectory() as tmp:
        pruned.save_pretrained(tmp)
        rebuilt = type(pruned).from_pretrained(tmp).eval()
        gap = float((_outputs(rebuilt, x) - _outputs(pruned, x)).abs().max())
    row["outcome"] = "exact" if gap <= ATOL else "WRONG"
    row["max_abs"] = gap
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from tests import hf_models
    from tests.real_models import declare_torchvision_ops

    declare_torchvision_ops()
    hf_models.transformers().utils.logging.disable_progress_bar()
    rows = []
    print(f"Plan(ratio=0.5), config='expressible' (the default); from_pretrained from files, "
          f"atol {ATOL}")  # fmt: skip
    print(f"{'type':<18} {'plan':<9} {'outcome':<9} {'max |Δ|':>8}  config changes / why")
    for model_type, (head, granularities) in hf_models.SAMPLE.items():
        for granularity in granularities:
            try:
                row = case(model_type, head, granularity)
            except Exception as exc:  # a table row, not a crash
                row = {"type": model_type, "granularity": granularity, "outcome": "FAILED",
                       "why": f"{type(exc).__name__}: {exc}"}  # fmt: skip
            rows.append(row)
            detail = (
                ", ".join(f"{k}={v}" for k, v in row.get("changes", {}).items())
                if row["outcome"] == "exact"
                else str(row.get("why", ""))[:160]
            )
            gap = f"{row['max_abs']:.1e}" if "max_abs" in row else ""
            print(f"{model_type:<18} {granularity:<9} {row['outcome']:<9} {gap:>8}  {detail}",
                  flush=True)  # fmt: skip
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("exact", "refused", "reported")}
    wrong = [r for r in rows if r["outcome"] in ("WRONG", "FAILED")]
    print(
        f"{len(rows)} cases: {counts['exact']} exact after from_pretrained, {counts['refused']} "
        f"refused (nothing the config can state), {counts['reported']} compiled and reported, "
        f"{len(wrong)} wrong or failed"
    )
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
