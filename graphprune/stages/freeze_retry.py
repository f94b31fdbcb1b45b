"""Structured pruning of one model: resolve, make consistent, rewrite, verify, freeze, retry.

1. **Setup** (once per compile): capture, analysis, and -- when a shape constant follows a
   prunable group -- the provenance trace and the count relations
   (:mod:`graphprune.planning.relations`).
2. **Resolve** the plan into kept channels per unit (:mod:`graphprune.planning.resolve`),
   then let the relation solver drive, tie or freeze groups and pick attribute values.
3. **Rewrite and verify** on a copy of the original model (``inplace``: on the model itself,
   undone on failure): slice, update attributes, run the rewritten model once, compare every
   shape constant with the value its torch call got (re-capturing only for constants whose
   call is unknown) and the output shapes (:mod:`graphprune.passes.verify`).
4. **Freeze and retry.** A rewrite that fails freezes the groups whose channels reach the
   failing line (or, when the failure names none, the smallest set found by bisection) with
   the failure as the reason, and everything is resolved again from the original model -- a
   bounded number of rounds. Only when nothing is left to prune does compile raise, with
   every reason. ``strict=True`` raises on the first failure instead.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch import Tensor, nn

from graphprune.analysis import DependencyGraph, Group, analyze_captured
from graphprune.analysis.cache import analysed
from graphprune.analysis.macs import count_macs
from graphprune.analysis.observe import Observed, observe
from graphprune.analysis.provenance import (
    AttrKey,
    ShapeTrace,
    attributes_read,
    link_read_tensors,
    trace_shapes,
)
from graphprune.analysis.registry import source_line
from graphprune.capture import Captured, ExampleInputs, copy_model
from graphprune.checks import GraphPruneWarning
from graphprune.oneshot.distributed import refuse
from graphprune.passes import structured_rewrite
from graphprune.passes.base import Pass, PassContext, PassManager, PruneError, RewriteFailure
from graphprune.passes.drop_layers import DropLayers, block_contributions, droppable_blocks
from graphprune.passes.undo import Undo
from graphprune.passes.verify import make_verifier, shapes_of
from graphprune.planning.config_ties import ConfigTies, config_ties
from graphprune.planning.importance import LossFn, NormSource, nonfinite_groups, score_groups
from graphprune.planning.plan import Plan, PlanError
from graphprune.planning.relations import (
    ConstantCall,
    Relation,
    build_relations,
    constant_calls,
    satisfy,
)
from graphprune.planning.resolve import ATTENTION_KINDS, Resolution, candidate_groups, resolve
from graphprune.planning.units import Units, pruning_units

MAX_ROUNDS = 8  # freeze-and-retry rounds before giving up on what is left


@dataclasses.dataclass
class ShapeModel:
    """How the forward computes its shape constants (None fields: nothing to follow)."""

    trace: ShapeTrace
    links: dict[int, str]
    relations: list[Relation]

    @classmethod
    def of(
        cls, model: nn.Module, x: ExampleInputs, captured: Captured, dg: DependencyGraph
    ) -> ShapeModel | None:
        """The shape model, or None when no shape constant follows a prunable group."""
        prunable = {g.id for g in dg.groups if g.prunable}
        if not any(prunable.intersection(c.groups) for c in dg.shape_constants):
            return None
        trace = trace_shapes(model, x)
        if trace.error:
            return cls(trace, {}, [])
        links = link_read_tensors(trace, captured, model, x) if trace.tensors else {}
        relations, _unknown = build_relations(dg, captured, trace, links)
        return cls(trace, links, relations)


@dataclasses.dataclass
class Setup:
    """Everything computed once per compile, shared by every trial."""

    original: nn.Module  # the user's: trials rewrite copies of it (inplace: it, with undo)
    example_inputs: ExampleInputs
    captured: Captured
    dg: DependencyGraph
    reference_shapes: Any
    macs_before: int
    shapes: ShapeModel | None
    calls: dict[tuple[str, str], ConstantCall]  # shape constant -> the original's eager call
    # how the model runs (a model on the meta device: under fake tensors) and where its
    # weights are read for scoring (None: the model's own)
    forward: Callable[[nn.Module, ExampleInputs], Observed] = observe
    weights: Mapping[str, Tensor] | None = None
    norms_from: NormSource | None = None  # wanda's input norms (None: the model's forward)

    def notes(self) -> list[str]:
        if self.shapes is not None and self.shapes.trace.error:
            return [
                "the shape trace could not run the forward with traced ints "
                f"({self.shapes.trace.error}); sizes it computes were checked after the "
                "rewrite instead"
            ]
        return []

    def context(self, model: nn.Module, resolution: Resolution) -> PassContext:
        return PassContext(
            model,
            self.example_inputs,
            self.captured,
            self.dg,
            resolution.kept,
            dict(resolution.attributes),
            read_attributes=self.read_attributes(),
            calls=self.calls,
        )

    def read_attributes(self) -> set[tuple[str, str]] | None:
        """The module attributes the forward's torch calls read (None: not traced)."""
        return None if self.shapes is None else attributes_read(self.shapes.trace)


@dataclasses.dataclass
class Outcome:
    model: nn.Module
    ctx: PassContext
    resolution: Resolution
    groups: list[Group]
    notes: list[str] = dataclasses.field(default_factory=list)


def setup(
    model: nn.Module,
    example_inputs: ExampleInputs,
    original: Observed,
    lap: Callable[[str], None],
    *,
    keep: bool = True,
    forward: Callable[[nn.Module, ExampleInputs], Observed] = observe,
    weights: Mapping[str, Tensor] | None = None,
    norms_from: NormSource | None = None,
) -> Setup:
    """Capture, analysis and shape model of ``model`` (reused from an earlier compile of the
    same structure, :mod:`graphprune.analysis.cache`; ``keep=False``: not stored for later).
    ``original``: the check's forward of the model (output shapes, MACs, torch calls)."""
    found = analysed(model, example_inputs, analyze_captured, lap, keep=keep)
    captured, dg = found.captured, found.dg
    shapes = found.derived("shapes", lambda: ShapeModel.of(model, example_inputs, captured, dg))
    calls = constant_calls(dg, captured, original.uses()) if dg.shape_constants else {}
    lap("shape relations")
    return Setup(
        model, example_inputs, captured, dg, shapes_of(original.output), original.macs, shapes,
        calls, forward, weights, norms_from,
    )  # fmt: skip


def attributes_for(
    model: nn.Module, example_inputs: ExampleInputs, captured: Captured, dg: DependencyGraph,
    kept: dict[int, list[int]],
) -> dict[AttrKey, int]:  # fmt: skip
    """The attribute values a resolution needs (records saved before attributes were stored:
    attributes used bare take the value their use needs)."""
    shapes = ShapeModel.of(model, example_inputs, captured, dg)
    if shapes is None:
        return {}
    solution = satisfy(
        shapes.relations, dg, shapes.trace, shapes.links, kept, lambda g: np.zeros(0), ()
    )
    return solution.attributes


# -- channels and heads -------------------------------------------------------------------------
class _Resolver:
    """Plan -> consistent resolution, for a ratio and a set of frozen groups."""

    def __init__(
        self,
        plan: Plan,
        s: Setup,
        groups: list[Group],
        units: Units,
        scores: dict[int, np.ndarray],
        modules: dict[str, nn.Module],
        model: nn.Module,
        batches: list[Any],
        loss_fn: LossFn | None,
    ) -> None:
        self.plan, self.s, self.groups, self.units = plan, s, groups, units
        self.scores, self.modules, self.model = scores, modules, model
        self.batches, self.loss_fn = batches, loss_fn
        # transformers: widths one config field holds move together (Plan.config)
        expressible = plan.config == "expressible"
        self.ties = config_ties(model, s.dg, groups) if expressible else ConfigTies()

    def group_scores(self, g: int) -> np.ndarray:
        """Scores of any group (groups outside the plan, driven by a relation, on demand)."""
        if g not in self.scores:
            group = self.s.dg.group(g)
            self.scores.update(
                score_groups(
                    self.model,
                    self.s.dg,
                    [group],
                    self.plan.importance,
                    batches=self.batches,
                    loss_fn=self.loss_fn,
                    seed=self.plan.seed,
                    weights=self.s.weights,
                    norms_from=self.s.norms_from,
                )
            )
        return self.scores[g]

    def __call__(
        self, ratio: float, frozen: dict[int, str], only: set[int] | None = None
    ) -> Resolution:
        """Resolution at ``ratio`` with ``frozen`` groups kept whole (and, for bisection, only
        the groups in ``only`` pruned). Attention groups a channel plan added on its own
        (``attention="auto"``) are left to the count relations where pruning them by the
        ratio would freeze a group: an inner width computed from the residual's (timm's
        ``reshape(B, N, C)``) follows it as a driven group instead."""
        found = self._resolve(ratio, frozen, only, skip=set())
        plan = self.plan
        channels = plan.granularity == "channels" and plan.attention == "auto"
        optional = {g.id for g in self.groups if g.kind in ATTENTION_KINDS} if channels else set()
        if not (optional and set(found.frozen) - set(frozen)):
            return found
        without = self._resolve(ratio, frozen, only, skip=optional)
        return without if len(without.frozen) < len(found.frozen) else found

    def _resolve(
        self, ratio: float, frozen: dict[int, str], only: set[int] | None, skip: set[int]
    ) -> Resolution:
        plan = dataclasses.replace(self.plan, ratio=ratio, target_macs=None)
        live = [g for g in self.groups if g.id not in frozen and g.id not in skip]
        units = Units(
            [u for u in self.units.units if u.group not in frozen and u.group not in skip],
            self.units.held,
        )
        live_ids = {g.id for g in live}
        ties = [(f, [g for g in gs if g in live_ids]) for f, gs in self.ties.classes]
        found = resolve(
            plan, self.s.dg, live, self.scores, self.modules, units=units, ties=ties
        )
        if only is not None:
            found.kept = {
                g: k if g in only else list(range(found.sizes[g])) for g, k in found.kept.items()
            }
        found.frozen.update(frozen)
        shapes = self.s.shapes
        if shapes is None or not shapes.relations:
            return found
        targeted = set(found.changed)
        solution = satisfy(
            shapes.relations,
            self.s.dg,
            shapes.trace,
            shapes.links,
            found.kept,
            self.group_scores,
            targeted,
        )
        for g, kept in solution.kept.items():
            found.kept[g] = kept
            found.sizes.setdefault(g, self.s.dg.group(g).size)
        found.attributes = solution.attributes
        found.frozen.update(solution.frozen)
        found.driven = solution.driven
        found.refresh_units()
        return found


def prune_channels(
    target: nn.Module,
    plan: Plan,
    s: Setup,
    batches: list[Any],
    loss_fn: LossFn | None,
    lap: Callable[[str], None],
    *,
    inplace: bool,
    strict: bool,
) -> Outcome:
    """Channels or heads (see the module docstring). ``target`` is the user's model when
    ``inplace`` (then every trial rewrites it, and a failed one is undone:
    :class:`~graphprune.passes.undo.Undo`), else a copy the first trial may rewrite (later
    trials rewrite fresh copies of the original)."""
    dg = s.dg
    modules = dict(s.original.named_modules())
    groups = candidate_groups(dg, plan, s.original)
    if plan.granularity == "heads" and not groups:
        raise PlanError(
            "granularity='heads' found no attention heads in this model: heads are recognised "
            "where q·k and the attention-weighted v are computed (scaled_dot_product_attention "
            "or matmul -> softmax -> matmul); use granularity='channels'"
        )
    if not groups and (plan.ratio or plan.target_macs):
        raise PruneError(_nothing_prunable(plan, dg))
    units = pruning_units(dg, groups, modules, plan.ratio or 0.5, plan.channel_multiple)
    scores = score_groups(
        s.original, dg, groups, plan.importance, batches=batches, loss_fn=loss_fn,
        seed=plan.seed, weights=s.weights, norms_from=s.norms_from,
    )  # fmt: skip
    lap("score")
    unranked = _nonfinite_note(scores, dg, s.original, plan)
    resolver = _Resolver(plan, s, groups, units, scores, modules, s.original, batches, loss_fn)
    heads = plan.granularity == "heads"

    def make() -> list[Pass]:
        return structured_rewrite(heads)

    verify = make_verifier(s.reference_shapes, s.forward)
    frozen: dict[int, str] = dict(resolver.ties.pinned)
    first = True
    for _ in range(MAX_ROUNDS):
        ratio = _ratio_for_target(plan, resolver, frozen, s, make)
        resolution = resolver(ratio, frozen)
        lap("resolve")
        # the user's model (inplace: undone if the rewrite fails) or a fresh copy
        model = target if first or inplace else copy_model(s.original)
        first = False
        if not resolution.changed and resolution.frozen and ratio > 0:
            break  # the relations froze everything the plan would prune
        undo = Undo.of(model) if inplace else None
        try:
            ctx, failure = _attempt(model, resolution, s, make, verify, undo)
        except BaseException:  # interrupted mid-rewrite: the user's model is put back
            if undo is not None:
                undo.restore()
            raise
        lap("rewrite and verify")
        if failure is None:
            notes = [unranked] if unranked else []
            notes += resolution.notes
            if ratio > 0 and not resolution.changed:
                notes.append(_nothing_pruned(plan, s.dg))
            return Outcome(ctx.model, ctx, resolution, groups, notes)
        if undo is not None:
            undo.restore()
        if strict:
            raise failure
        culprits = _culprits(failure, resolution, s)
        if not culprits:
            culprits = _bisect(sorted(resolution.changed), resolver, ratio, frozen, s, make, verify)
        reason = _first_line(str(failure))
        frozen.update({g: f"the rewrite failed: {reason}" for g in culprits})
        if not set(resolution.changed) - set(culprits):
            resolution = resolver(ratio, frozen)
            break
    raise PruneError(_nothing_left(plan, resolution.frozen, dg))


def _nonfinite_note(
    scores: dict[int, np.ndarray], dg: DependencyGraph, model: nn.Module, plan: Plan
) -> str:
    """Scores that are NaN or inf are not a ranking. Where the group's own weights are NaN or
    inf (the model check warned already), or the plan says ``nonfinite="rank"``, they are
    ranked explicitly (NaN and +inf kept first, -inf removed first) with a warning and a
    report note naming the groups; otherwise (a criterion or gradients that overflowed) the
    plan refuses, naming them."""
    bad = nonfinite_groups(scores)
    if not bad:
        return ""
    listed = ", ".join(f"group {g} ({dg.group(g).name}: {n})" for g, n in sorted(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    where = f"importance scores are NaN or inf in {len(bad)} group(s): {listed}{more} channels"
    state = dict(model.state_dict(keep_vars=False))
    from_weights = all(
        any(not state[m.fqn].isfinite().all() for m in dg.group(g).members if m.fqn in state)
        for g in bad
    )
    if plan.nonfinite != "rank" and not from_weights:
        raise PlanError(
            f"{where}; a criterion or gradients that overflow give no ranking: fix them (a "
            "loss_fn on the right scale, finite scores from a callable), or pass "
            "Plan(nonfinite='rank') to keep NaN/+inf channels first and remove -inf first"
        )
    for g in bad:  # NaN sorts nowhere: rank it explicitly, as +inf (-inf stays last)
        scores[g] = np.nan_to_num(scores[g], nan=np.inf, posinf=np.inf, neginf=-np.inf)
    note = (
        f"{where}; NaN and +inf channels were ranked most important (kept first), -inf least; "
        "fix the weights, gradients or criterion for a real ranking"
    )
    warnings.warn(note, GraphPruneWarning, stacklevel=2)
    return note


def _attempt(
    model: nn.Module,
    resolution: Resolution,
    s: Setup,
    make: Callable[[], list[Pass]],
    verify: Callable[[PassContext], None],
    undo: Undo | None = None,
) -> tuple[PassContext, PruneError | None]:
    """Rewrite ``model`` as ``resolution`` says and verify it; the context and the failure
    (None when it worked). ``undo``: the in-place rewrite's, told what slicing cuts away."""
    ctx = s.context(model, resolution)
    ctx.undo = undo
    try:
        PassManager(make(), verify=verify)(ctx)
    except PruneError as exc:
        return ctx, exc
    except Exception as exc:  # a pass that met a module it cannot rewrite: same treatment
        return ctx, RewriteFailure(f"{type(exc).__name__}: {_first_line(str(exc))}")
    finally:
        ctx.undo = None  # the caller restores from its own reference; the context keeps none
    return ctx, None


def _culprits(failure: PruneError, resolution: Resolution, s: Setup) -> set[int]:
    """Changed groups the failure points at: named ones, or those reaching its line."""
    changed = set(resolution.changed)
    if not isinstance(failure, RewriteFailure):
        return set()
    found = failure.groups & changed
    if found or not failure.line:
        return found
    for node in s.captured.graph.nodes:
        if not _node_line(node).startswith(failure.line):
            continue
        for n in [node, *node.all_input_nodes]:
            d = 0
            while (rows := s.dg.node_channels(n.name, d)) is not None:
                found.update(g for row in rows for g, _ in row if g in changed)
                d += 1
    return found


def _node_line(node: Any) -> str:
    return source_line(node)


def _bisect(
    changed: list[int],
    resolver: _Resolver,
    ratio: float,
    frozen: dict[int, str],
    s: Setup,
    make: Callable[[], list[Pass]],
    verify: Callable[[PassContext], None],
) -> set[int]:
    """A small set of changed groups whose pruning alone fails (halving: about 2·log2(n)
    trial rewrites); all of them when only the whole set fails."""

    def fails(subset: list[int]) -> bool:
        trial = resolver(ratio, frozen, only=set(subset))
        return _attempt(copy_model(s.original), trial, s, make, verify)[1] is not None

    candidates = list(changed)
    while len(candidates) > 1:
        half = candidates[: len(candidates) // 2]
        rest = candidates[len(half) :]
        if fails(half):
            candidates = half
        elif fails(rest):
            candidates = rest
        else:
            break  # fails only together
    return set(candidates)


def _ratio_for_target(
    plan: Plan,
    resolver: _Resolver,
    frozen: dict[int, str],
    s: Setup,
    make: Callable[[], list[Pass]],
) -> float:
    """``plan.ratio``, or the smallest ratio whose rewrite meets ``plan.target_macs``."""
    if plan.target_macs is None:
        return plan.ratio or 0.0

    def macs_ratio(ratio: float) -> float:
        trial = copy_model(s.original)
        PassManager(make())(s.context(trial, resolver(ratio, frozen)))
        return count_macs(trial, s.example_inputs) / max(s.macs_before, 1)

    return _bisect_ratio(plan, macs_ratio)


MACS_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # ratios tried first


def _bisect_ratio(plan: Plan, macs_ratio: Callable[[float], float]) -> float:
    """The smallest ratio found whose rewrite keeps at most ``target_macs`` of the MACs.

    MACs need not fall monotonically with the ratio (rounding to ``round_to``,
    ``min_channels`` and the count relations make them jump), so a grid of ratios is measured
    first; the answer is bisected between the first grid ratio that meets the target and the
    one before it. Out of reach only when no grid ratio meets it (the least kept is named).
    """
    target = plan.target_macs or 1.0
    reached: dict[float, float] = {}
    for ratio in MACS_GRID:
        reached[ratio] = macs_ratio(ratio)
        if reached[ratio] <= target:
            break
    else:
        best = min(reached, key=lambda r: reached[r])
        raise PlanError(
            f"target_macs={plan.target_macs} is out of reach: the fewest MACs any ratio up to "
            f"0.95 keeps is {reached[best]:.3f} (at ratio {best})"
        )
    hi = ratio
    lo = max((r for r in MACS_GRID if r < hi), default=0.0)
    for _ in range(8):
        mid = (lo + hi) / 2
        if macs_ratio(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _first_line(text: str, width: int = 400) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _nothing_left(plan: Plan, frozen: dict[int, str], dg: DependencyGraph) -> str:
    reasons = [f"  group {g} ({dg.group(g).name}): {why}" for g, why in sorted(frozen.items())]
    hints = []
    if any(why.startswith("config: ") for why in frozen.values()):
        hints.append(
            "  hint: the model's config class cannot state any smaller widths here; "
            "Plan(config='free') prunes them anyway (save with graphprune.save)"
        )
    if any(not why.startswith("config: ") for why in frozen.values()):
        hints.append(
            "  hint: a size the forward computes from a tensor's shape or a literal cannot "
            "follow the pruned channels; compute it from a module attribute (e.g. self.n_head, "
            "self.head_dim) that graphprune can update, or exclude these layers with ignore=[...]"
        )
    return (
        f"nothing could be pruned with granularity={plan.granularity!r}, ratio={plan.ratio}: "
        "every group the plan prunes was frozen:\n" + "\n".join(reasons + hints)
    )


def _nothing_prunable(plan: Plan, dg: DependencyGraph) -> str:
    """Why no group of the plan's kind is prunable: the analysis's reasons, most common first."""
    counts: dict[str, int] = {}
    for g in dg.groups:
        for reason in g.frozen_reasons[:1]:
            counts[reason] = counts.get(reason, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    lines = [f"  {n} group(s): {reason}" for reason, n in top]
    return (
        f"nothing can be pruned with granularity={plan.granularity!r}: the analysis froze "
        f"every group of that kind ({len(dg.groups)} groups):\n" + "\n".join(lines)
    )


# -- layers -------------------------------------------------------------------------------------
def _nothing_pruned(plan: Plan, dg: DependencyGraph) -> str:
    """Why a plan that runs pruned nothing: the analysis froze the groups (most common
    reasons first), or what is left is narrower than round_to or ignored."""
    reasons = Counter(
        g.frozen_reasons[0].split(" (")[0] for g in dg.groups if g.frozen_reasons
    ).most_common(3)
    frozen = sum(count for _, count in reasons)
    why = (
        f"; the analysis froze {frozen} groups ("
        + "; ".join(f"{reason} x{count}" for reason, count in reasons)
        + ", see gp.analyze)"
        if frozen
        else ""
    )
    return (
        "nothing was pruned: every group the plan could prune is narrower than "
        f"round_to={plan.channel_multiple} or ignored (round_to=1 prunes exact counts){why}"
    )


def prune_layers(
    target: nn.Module, plan: Plan, s: Setup, batches: list[Any], lap: Callable[[str], None]
) -> Outcome:
    candidates = [b for b in droppable_blocks(target, s.captured) if not plan.ignores([b])]
    if not candidates:
        raise PlanError(
            "granularity='layers' found no residual block (y = x + f(x)) to "
            "drop in this model; use granularity='channels'"
        )
    droppable = droppable_blocks(target, s.captured, s.example_inputs)
    blocks = [b for b in droppable if not plan.ignores([b])]
    if not blocks:
        raise PlanError(
            f"granularity='layers': none of the {len(candidates)} residual blocks returns a "
            "tensor shaped like its input, so none can be replaced by a skip; use "
            "granularity='channels'"
        )
    order = _rank_blocks(target, blocks, plan, batches)
    lap("score")

    def passes(ratio: float) -> list[Pass]:
        return [DropLayers(order[: math.floor(ratio * len(order) + 1e-9)])]

    ratio = plan.ratio or 0.0
    if plan.target_macs is not None:

        def macs_ratio(r: float) -> float:
            trial = copy_model(s.original)
            PassManager(passes(r))(s.context(trial, Resolution()))
            return count_macs(trial, s.example_inputs) / max(s.macs_before, 1)

        ratio = _bisect_ratio(plan, macs_ratio)
    lap("resolve")
    ctx = s.context(target, Resolution())
    PassManager(passes(ratio), verify=make_verifier(s.reference_shapes))(ctx)
    notes = []
    if not ctx.dropped:
        notes.append(
            f"nothing was dropped: {ratio:g} of {len(order)} droppable blocks rounds down to "
            f"none (ratio >= {1 / len(order):.3g} drops one)"
        )
    return Outcome(target, ctx, Resolution(), [], notes)


def _rank_blocks(model: nn.Module, blocks: list[str], plan: Plan, batches: list[Any]) -> list[str]:
    """Blocks in the order they should be dropped: least contribution (or random) first."""
    if plan.importance == "random":
        order = np.random.default_rng(plan.seed).permutation(len(blocks))
        return [blocks[i] for i in order]
    refuse("ranking layers by their contribution (granularity='layers')")
    contributions = block_contributions(model, blocks, batches)
    return sorted(blocks, key=lambda b: (contributions[b], blocks.index(b)))
