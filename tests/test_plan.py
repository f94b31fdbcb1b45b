from __future__ import annotations

from pathlib import Path

import pytest

import graphprune as gp
from graphprune.planning.plan import keep_count


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, r"ratio=1.0 is outside \[0, 1\)"),
        ({"ratio": -0.1}, r"outside \[0, 1\)"),
        ({}, "exactly one of ratio"),
        ({"ratio": 0.5, "target_macs": 0.5}, "exactly one of ratio"),
        ({"target_macs": 0.0}, r"outside \(0, 1\]"),
        ({"ratio": 0.5, "importance": "l3"}, "unknown importance 'l3'; use one of l1, l2"),
        ({"ratio": 0.5, "scope": "galaxy"}, "scope='galaxy'"),
        ({"ratio": 0.5, "granularity": "blocks"}, "granularity='blocks'"),
        ({"ratio": 0.5, "round_to": 0}, "round_to=0; use an int >= 1 or 'auto'"),
        ({"ratio": 0.5, "min_channels": 0}, "min_channels must be >= 1"),
        ({"ratio": 0.5, "overrides": {"fc": 1.5}}, "override 'fc'"),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(gp.PlanError, match=message):
        gp.Plan(**kwargs)  # type: ignore[arg-type]


def test_json_and_yaml_round_trip(tmp_path: Path) -> None:
    plan = gp.Plan(
        ratio=0.3,
        scope="global",
        importance="taylor",
        ignore=["fc"],
        overrides={"layer1.*": 0.1},
        round_to=8,
    )
    for name in ("plan.json", "plan.yaml"):
        plan.save(tmp_path / name)
        assert gp.Plan.load(tmp_path / name) == plan
    assert gp.Plan.from_json(plan.to_json()) == plan


def test_unknown_keys_and_callables() -> None:
    with pytest.raises(gp.PlanError, match=r"unknown plan keys \['ratoi'\]"):
        gp.Plan.from_dict({"ratoi": 0.5})
    with pytest.raises(gp.PlanError, match="cannot be serialised"):
        gp.Plan(ratio=0.5, importance=lambda g, t, d: None).to_json()


def test_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(gp.PlanError, match="not valid JSON"):
        gp.Plan.load(path)


def test_patterns_and_heads() -> None:
    plan = gp.Plan(ratio=0.5, ignore=["head*"], overrides={"block.?.fc": 0.2})
    plan.check_patterns(["block.1.fc", "head"])
    with pytest.raises(gp.PlanError, match="'head\\*' matches no module"):
        plan.check_patterns(["block.1.fc"])
    assert plan.ratio_for(["block.1.fc"]) == 0.2 and plan.ratio_for(["other"]) == 0.5
    gp.Plan(ratio=0.25).check_heads(8, "attn")
    with pytest.raises(gp.PlanError, match=r"use a ratio that removes whole heads: 0, 0\.25"):
        gp.Plan(ratio=0.3).check_heads(4, "attn")


@pytest.mark.parametrize(
    ("size", "ratio", "round_to", "minimum", "kept"),
    [
        (16, 0.5, 1, 1, 8),
        (16, 0.3, 1, 1, 12),
        (16, 0.7, 8, 1, 8),
        (20, 0.5, 8, 1, 16),
        (5, 0.5, 8, 1, 5),  # smaller than round_to: left whole
        (16, 0.99, 1, 4, 4),
        (3, 0.0, 1, 1, 3),
    ],
)
def test_keep_count(size: int, ratio: float, round_to: int, minimum: int, kept: int) -> None:
    assert keep_count(size, ratio, round_to, minimum) == kept


def test_round_to_auto_is_the_simd_block() -> None:
    plan = gp.Plan(ratio=0.5, round_to="auto")
    assert plan.channel_multiple in (4, 8, 16)
    assert gp.Plan.from_json(plan.to_json()).round_to == "auto"
