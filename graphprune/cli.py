"""The ``graphprune`` command: ``graphprune analyze|compile|export|bench|sparsity MODEL``.

MODEL is a name from ``graphprune.models`` (``graphprune analyze --list``) or a
``package.module:factory`` spec whose factory takes no arguments and returns an nn.Module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.advise import advise, default_candidates, plot_advice
from graphprune.analysis import analyze
from graphprune.analysis.macs import count_macs, count_params, si
from graphprune.checkpoint import compile_checkpoint
from graphprune.compile import compile
from graphprune.errors import GraphPruneError, InputError
from graphprune.io import write_text_atomic
from graphprune.models import ALL
from graphprune.onnx import export_onnx
from graphprune.onnx.export import export
from graphprune.onnx.runtimes import get_runtime
from graphprune.onnx.sparse_report import measure_sparsity
from graphprune.planning.plan import (
    ATTENTION,
    CONFIG_MODES,
    GRANULARITIES,
    LATENCY_RUNTIMES,
    Plan,
)
from graphprune.report import report
from graphprune.serialize import load, save
from graphprune.stages.sparse import finalize


def parse_shape(text: str) -> tuple[int, ...]:
    """``3,224,224`` -> (3, 224, 224); anything else is an InputError saying so."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise InputError(
            f"--input-shape {text!r}: give positive ints separated by commas, e.g. 3,224,224"
        )
    return shape


def load_model(
    spec: str, input_shape: str | None, batch: int, tokens: int | None
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the model and example inputs named by ``spec`` (zoo name or ``pkg.mod:factory``)."""

    if ":" not in spec:
        if spec not in ALL:
            raise InputError(
                f"unknown model '{spec}'; use a zoo name ({', '.join(ALL)}) "
                f"or 'package.module:factory'"
            )
        zoo = ALL[spec]
        model = zoo.build()
        if input_shape is None:
            return model, zoo.example_inputs(batch)
    else:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"cannot load '{spec}': {exc}") from exc
        try:
            model = factory()
        except Exception as exc:  # the user's factory: its error, as one line
            raise InputError(
                f"'{spec}' failed to build the model: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(model, nn.Module):
            raise InputError(f"'{spec}' returned {type(model).__name__}, not an nn.Module")
        if input_shape is None:
            raise InputError(f"'{spec}' needs --input-shape, e.g. --input-shape 3,224,224")
    shape = parse_shape(input_shape)
    if tokens:
        return model, (torch.randint(0, tokens, (batch, *shape)),)
    return model, (torch.randn(batch, *shape),)


def _cmd_analyze(args: argparse.Namespace) -> int:
    model, inputs = load_model(args.model, args.input_shape, args.batch, args.tokens)
    dg = analyze(model, inputs)
    print(dg.summary() if args.summary else dg.table(include_frozen=not args.prunable_only))
    for name in args.explain or []:
        print()
        dg.explain(name)
    if args.json:
        write_text_atomic(Path(args.json), dg.to_json())
        print(f"wrote {args.json}")
    return 0


def plan_from_args(args: argparse.Namespace) -> Plan:
    """``--plan file`` as the base; flags given on the command line override its keys."""
    data = Plan.load(args.plan).to_dict() if args.plan else {}
    flags = {
        "ratio": args.ratio,
        "target_macs": args.target_macs,
        "target_latency": args.target_latency,
        "target_latency_ms": args.target_latency_ms,
        "latency_runtime": args.latency_runtime,
        "scope": args.scope,
        "importance": args.importance,
        "granularity": args.granularity,
        "attention": args.attention,
        "config": args.config_mode,
        "round_to": args.round_to,
        "min_channels": args.min_channels,
        "nm": args.nm,
        "block": args.block,
        "reconstruct": args.reconstruct,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.ignore:
        data["ignore"] = list(args.ignore)
    if args.include:
        data["include"] = list(args.include)
    targets = ("target_macs", "target_latency", "target_latency_ms")
    if any(data.get(t) is not None for t in targets) and args.ratio is None:
        data.pop("ratio", None)
    if data.get("granularity") == "n:m":
        if args.ratio is None:
            data.pop("ratio", None)  # implied by n:m
    elif "ratio" not in data and not any(data.get(t) is not None for t in targets):
        data["ratio"] = 0.5
    return Plan.from_dict(data)


def calibration_from_args(args: argparse.Namespace, batch: int = 32) -> list[Any] | None:
    """``--calibration FILE``: a tensor split into batches of ``batch``, or a list of batches."""
    if not getattr(args, "calibration", None):
        return None
    import torch

    try:
        data = torch.load(args.calibration, weights_only=True)
    except Exception as exc:  # a missing, corrupt or pickled-object file
        raise InputError(
            f"--calibration {args.calibration}: not a file torch.load can read with "
            f"weights_only=True ({type(exc).__name__}); save a tensor or a list of tensors "
            "with torch.save"
        ) from exc
    if isinstance(data, torch.Tensor):
        return list(data.split(batch))
    if isinstance(data, list | tuple) and data:
        return list(data)
    raise InputError(
        f"--calibration {args.calibration}: holds {type(data).__name__}; save a tensor "
        "(N, ...) or a list of input batches"
    )


def _progress(message: str) -> Any:
    """A spinner on stderr for a long step (plain text when stderr is not a terminal)."""
    from rich.console import Console

    return Console(stderr=True).status(message)


def _cmd_export(args: argparse.Namespace) -> int:

    model, inputs = load_model(args.model, args.input_shape, args.batch, args.tokens)
    pruning = args.plan or any(
        v is not None
        for v in (
            args.ratio,
            args.target_macs,
            args.target_latency,
            args.target_latency_ms,
            args.granularity,
        )
    )
    target, baseline = model, None
    if args.load:  # a model saved by `graphprune compile -o`: rebuilt, not recompiled
        if pruning:
            raise InputError("give either --load FILE or a plan (--ratio, --plan, ...), not both")
        fresh, _ = load_model(args.model, args.input_shape, args.batch, args.tokens)
        target, baseline = load(fresh, args.load, inputs), model
        print(f"loaded {args.load}\n  {report_line(model, target, inputs)}")
    elif pruning:
        with _progress("pruning"):
            plan, calibration = plan_from_args(args), calibration_from_args(args)
            target = compile(model, plan, inputs, calibration=calibration)
            baseline = model
        print(report(target).table(max_groups=12, width=80))
    what = "exporting, verifying in onnxruntime" + (" and timing" if args.bench else "")
    with _progress(what):
        result = export_onnx(
            target,
            inputs,
            args.output,
            quantize=args.quantize,
            dynamic_batch=not args.static_batch,
            baseline=baseline,
            bench_runs=args.runs if args.bench and baseline is not None else 0,
            batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
            threads=args.threads,
            sparse_storage=args.sparse_storage,
        )
    print(result.table())
    return 0


def report_line(model: nn.Module, pruned: nn.Module, inputs: Any) -> str:
    """``params 11.7 M -> 3.1 M, MACs 4.44 G -> 1.11 G (0.251 kept)``."""

    macs = count_macs(model, inputs), count_macs(pruned, inputs)
    return (
        f"params {si(count_params(model))} -> {si(count_params(pruned))}, MACs "
        f"{si(macs[0])} -> {si(macs[1])} ({macs[1] / max(macs[0], 1):.3f} kept)"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    model, inputs = load_model(args.model, args.input_shape, args.batch, args.tokens)
    with _progress("pruning"):
        pruned = compile(model, plan_from_args(args), inputs)
    print(report(pruned).table())
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    with (
        tempfile.TemporaryDirectory() as tmp,
        _progress(f"exporting, verifying and timing ({args.runs} interleaved runs per batch size)"),
    ):
        result = export_onnx(
            pruned,
            inputs,
            Path(tmp) / "pruned.onnx",
            baseline=model,
            quantize=args.quantize,
            bench_runs=args.runs,
            batch_sizes=sizes,
            threads=args.threads,
        )
    print(result.table())
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(result.to_dict(), indent=1, default=str))
    return 0


def _cmd_sparsity(args: argparse.Namespace) -> int:

    model, inputs = load_model(args.model, args.input_shape, args.batch, args.tokens)
    plan = plan_from_args(args)
    if plan.sparse_plan is None:
        raise InputError(
            "graphprune sparsity needs a sparse plan: --granularity unstructured, n:m or block"
        )
    with _progress("masking"):
        masked = compile(model, plan, inputs)
    print(report(masked).table())
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    with _progress("timing sparse kernels, exporting compact ONNX, timing onnxruntime"):
        result = measure_sparsity(
            masked, inputs, batch_sizes=sizes, runs=args.runs, threads=args.threads
        )
    print(result.table())
    if args.output:
        exported = export(finalize(masked), inputs, args.output, sparse_storage="auto")
        print(f"wrote {exported.path} ({exported.bytes / 1e6:.2f} MB, compact sparse storage)")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(result.to_dict(), indent=1, default=str))
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    model, inputs = load_model(args.model, args.input_shape, args.batch, args.tokens)
    plan = plan_from_args(args)
    pruned = compile(model, plan, inputs, calibration=calibration_from_args(args))
    defaults = Plan(ratio=0.5).to_dict()
    shown = " ".join(
        f"{k}={v}"
        for k, v in plan.to_dict().items()
        if v != defaults[k] or k in ("ratio", "importance", "granularity")
    )
    print(f"graphprune compile {args.model}: {shown}")
    print(report(pruned).table(max_groups=12, width=80))
    if args.output:
        save(pruned, args.output)
        print(f"wrote {args.output} (graphprune.load(fresh_model, path, inputs) reads it)")
    return 0


def random_batches(inputs: tuple[torch.Tensor, ...], count: int, seed: int) -> list[Any]:
    """``count`` batches shaped like ``inputs``: normal floats, integers in the inputs' range
    (token ids) -- calibration for a model the CLI built with random weights."""
    generator = torch.Generator().manual_seed(seed)

    def like(t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point:
            return torch.randn(t.shape, generator=generator, dtype=t.dtype)
        high = max(int(t.max()) + 1, 2)
        return torch.randint(0, high, t.shape, generator=generator, dtype=t.dtype)

    return [tuple(like(t) for t in inputs) for _ in range(count)]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _cmd_compile_checkpoint(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    found = compile_checkpoint(
        args.src, plan, args.dst, calibration=calibration_from_args(args),
        verify_bytes=int(args.verify_gib * 2**30), progress=True, offload_dir=args.offload_dir,
    )  # fmt: skip
    print(f"graphprune compile-checkpoint {args.src} -> {args.dst}")
    macs = found.macs_after / max(found.macs_before, 1)
    print(f"  parameters {si(found.params_before)} -> {si(found.params_after)} "
          f"({found.param_ratio:.3f}), MACs kept {macs:.3f}")  # fmt: skip
    masked = [m for m in found.sparsity if m.pattern != "dense"]
    if masked:
        zeros = sum(m.sparsity for m in masked) / len(masked)
        dense = len(found.sparsity) - len(masked)
        print(
            f"  masked layers: {len(masked)} ({zeros:.1%} zeros on average), {dense} left "
            "dense (stored dense with zeros: storage and speed as the dense model)"
        )
    for method, title in (("sparsegpt", "SparseGPT"), ("least squares", "refit")):
        done = [f for f in found.fits if f.method == method]
        if done:
            print(
                f"  {title}: {len(done)} layers, error summed "
                f"{sum(f.error_before for f in done):.4g} -> "
                f"{sum(f.error_after for f in done):.4g}"
            )
    if found.resumed:
        print(f"  resumed: {len(found.resumed)} blocks kept from the interrupted run")
    for name, (kept, total) in list(found.kept.items())[:8]:
        print(f"  {name}: {kept} of {total}")
    if found.config is not None:
        changes = ", ".join(f"{k}={v}" for k, v in found.config.changes.items()) or "none"
        state = "synced" if found.config.expressible else f"NOT synced: {found.config.reason}"
        print(f"  config {state} ({changes})")
    print(f"  verified: {found.verified}")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in found.seconds.items()))
    return 0


def _cmd_advise(args: argparse.Namespace) -> int:
    model, inputs = load_model(args.model, args.input_shape, args.batch, args.tokens)
    runtimes = tuple(r.strip() for r in args.runtimes.split(",") if r.strip())
    first = next((r for r in runtimes if get_runtime(r).available()), "onnxruntime")
    candidates = default_candidates(
        latency_targets=_floats(args.latency_targets), sparsities=_floats(args.sparsities),
        runtime=first, threads=args.threads, two_four=not args.no_2_4,
    )  # fmt: skip
    out = Path(args.out)
    advice = advise(
        model, inputs, calibration=random_batches(inputs, args.calibration_batches, seed=1),
        runtimes=runtimes, threads=args.threads, budget_s=args.budget_s, candidates=candidates,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), runs=args.runs,
        out=out, tolerance=args.tolerance,
    )  # fmt: skip
    print(advice.table())
    advice.save_json(out / "advice.json")
    written = [out / "advice.json"]
    try:
        written.append(plot_advice(advice, out / "advice.png", title=f"advise {args.model}"))
    except ImportError:  # matplotlib is the plots extra
        print("no plot: pip install 'graphprune[plots]' (matplotlib)", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written) + f" and the ONNX files in {out}/")
    return 0


def _cmd_list(_: argparse.Namespace) -> int:

    width = max(len(n) for n in ALL)
    for name, spec in ALL.items():
        print(f"{name:<{width}}  {spec.description}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name or package.module:factory")
    p.add_argument("--input-shape", help="input shape without batch, e.g. 3,224,224")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example input")
    p.add_argument("--tokens", type=int, help="make integer token ids in [0, TOKENS)")


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", help="a plan file (.json or .yaml); flags override its keys")
    p.add_argument("--ratio", type=float, help="fraction of channels removed (default 0.5)")
    p.add_argument("--target-macs", type=float, help="fraction of MACs to keep instead")
    p.add_argument(
        "--target-latency",
        type=float,
        help="fraction of the measured onnxruntime latency to keep instead (channels)",
    )
    p.add_argument(
        "--target-latency-ms", type=float, help="absolute onnxruntime latency budget instead"
    )
    p.add_argument(
        "--latency-runtime",
        choices=list(LATENCY_RUNTIMES),
        help="the runtime latency targets are measured in (default onnxruntime)",
    )
    p.add_argument("--scope", choices=["local", "global"])
    p.add_argument("--importance", help="l1, l2, bn_scale, random, taylor, fisher, fpgm, wanda")
    p.add_argument(
        "--reconstruct",
        action="store_true",
        default=None,
        help="refit the kept weights to the original layer outputs (least squares; SparseGPT "
        "for sparse plans) on the --calibration data",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration inputs: a torch.save'd tensor (N, ...) or list of batches (default: "
        "the example input)",
    )
    p.add_argument("--granularity", choices=list(GRANULARITIES))
    p.add_argument(
        "--attention",
        choices=list(ATTENTION),
        help="channel plans: narrow the attention by head_dim or whole heads (auto, the "
        "default: heads where head_dim's size matters), or keep it whole",
    )
    p.add_argument(
        "--config",
        dest="config_mode",
        choices=list(CONFIG_MODES),
        help="transformers models: keep widths the config can state (expressible, the "
        "default: from_pretrained rebuilds the result) or allow any (free: graphprune save)",
    )
    p.add_argument(
        "--nm",
        type=lambda v: [int(k) for k in v.split(":")],
        help="n:m pattern, e.g. 2:4 (with --granularity n:m)",
    )
    p.add_argument(
        "--block",
        type=lambda v: [int(k) for k in v.split("x")],
        help="block shape ROWSxCOLS, e.g. 4x4 (with --granularity block)",
    )
    p.add_argument(
        "--include", action="append", metavar="GLOB", help="sparse plans: only mask these"
    )
    p.add_argument(
        "--round-to",
        type=lambda v: v if v == "auto" else int(v),
        help="each layer's kept width a multiple of N; 'auto' (default): this CPU's SIMD "
        "block; 1: exact counts",
    )
    p.add_argument("--min-channels", type=int, help="never keep fewer channels in a layer")
    p.add_argument("--ignore", action="append", metavar="GLOB", help="module glob to keep")


def _advise_parser(sub: Any) -> None:
    p = sub.add_parser(
        "advise",
        help="build every kind of pruning of MODEL (one-shot), export, verify and time each on "
        "the runtimes; tables, Pareto front and a recommendation",
    )
    _model_args(p)
    p.add_argument("--runtimes", default="onnxruntime,openvino", help="comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=900.0, help="time budget in seconds")
    p.add_argument("--latency-targets", default="0.75,0.5,0.35",
                   help="structured candidates: fractions of the original latency")  # fmt: skip
    p.add_argument("--sparsities", default="0.5,0.75,0.9", help="unstructured candidates")
    p.add_argument("--no-2-4", action="store_true", help="no 2:4 candidate")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--runs", type=int, default=30, help="interleaved runs at batch 1")
    p.add_argument("--calibration-batches", type=int, default=8,
                   help="random batches like the example input (a quarter held back)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=0.01, help="quality loss accepted")
    p.add_argument("--out", default="out/advise", help="folder for the files and advice")
    p.set_defaults(run=_cmd_advise)


def _checkpoint_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compile-checkpoint",
        help="prune a save_pretrained checkpoint (SRC) into a new one (DST), layer by layer, "
        "without loading the model",
    )
    p.add_argument("src", help="a directory written by save_pretrained (safetensors)")
    p.add_argument("dst", help="a new directory for the pruned checkpoint")
    _plan_args(p)
    p.add_argument("--verify-gib", type=float, default=4.0,
                   help="compare with an in-memory compile up to this model size")  # fmt: skip
    p.add_argument("--offload-dir", default=None,
                   help="sparse wanda / SparseGPT: a forward per calibration batch, each "
                   "block's input kept in a file here (as much calibration data as the disk "
                   "holds)")  # fmt: skip
    p.set_defaults(run=_cmd_compile_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphprune", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="print the groups of coupled channels of MODEL")
    _model_args(p)
    p.add_argument(
        "--explain",
        action="append",
        metavar="NAME",
        help="print the coupling paths of a parameter or module (repeatable)",
    )
    p.add_argument("--prunable-only", action="store_true", help="hide frozen groups")
    p.add_argument("--summary", action="store_true", help="a short overview (80 columns)")
    p.add_argument("--json", help="also write the groups as JSON to this file")
    p.set_defaults(run=_cmd_analyze)

    p = sub.add_parser("compile", help="prune MODEL and print the before/after table")
    _model_args(p)
    _plan_args(p)
    p.add_argument("-o", "--output", help="save the pruned model here (graphprune.save)")
    p.set_defaults(run=_cmd_compile)

    p = sub.add_parser("export", help="export MODEL (pruned when a plan is given) to ONNX")
    _model_args(p)
    _plan_args(p)
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--load", help="a pruned model saved by `graphprune compile -o FILE`")
    p.add_argument(
        "--bench",
        action="store_true",
        help="also time the original and the pruned model side by side in onnxruntime",
    )
    p.add_argument("--runs", type=int, default=30, help="interleaved runs per batch size")
    p.add_argument("--batch-sizes", default="1", help="comma-separated (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", choices=["dynamic", "static"], help="also write an int8 model")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension")
    p.add_argument(
        "--sparse-storage",
        choices=["auto", "bitmask"],
        help="store mostly-zero weights compactly (smaller file, same onnxruntime speed)",
    )
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("bench", help="prune MODEL, export both, time them in onnxruntime")
    _model_args(p)
    _plan_args(p)
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50, help="interleaved runs per batch size")
    p.add_argument("--quantize", choices=["dynamic", "static"], help="also verify int8")
    p.add_argument("--json", help="also write the results as JSON here")
    p.set_defaults(run=_cmd_bench)

    p = sub.add_parser(
        "sparsity",
        help="mask MODEL's weights, report storage and measured speed (torch sparse kernels, "
        "onnxruntime compact storage)",
    )
    _model_args(p)
    _plan_args(p)
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated (default 1,32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30, help="interleaved runs per batch size")
    p.add_argument("-o", "--output", help="also write the compact ONNX model here")
    p.add_argument("--json", help="also write the report as JSON here")
    p.set_defaults(run=_cmd_sparsity)

    _advise_parser(sub)

    _checkpoint_parser(sub)

    p = sub.add_parser("models", help="list the built-in models")
    p.set_defaults(run=_cmd_list)
    for command in sub.choices.values():  # --debug after the command name works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. User errors (a bad plan, model, input or file) print one line and exit
    2; ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (GraphPruneError, OSError) as exc:
        if args.debug:
            raise
        print(f"graphprune: error: {_message(exc)}", file=sys.stderr)
        return 2


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, GraphPruneError) else f"{type(exc).__name__}: {text}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
