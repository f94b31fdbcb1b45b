"""Which convs onnxruntime runs in its blocked layout: the check behind "MACs fell, latency not".

On x86 onnxruntime rewrites convs into a blocked NCHWc layout (channels in SIMD-wide blocks,
16 fp32 with AVX-512) and inserts ``ReorderInput``/``ReorderOutput`` copies where a tensor
leaves it. A conv whose channels (per conv group) are not whole blocks stays in plain NCHW with
copies around it, so a pruned model with odd widths can be slower per MAC than its original.
This reads onnxruntime's own optimised graph, so what it reports is what runs.
"""

from __future__ import annotations

import ast
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from graphprune.onnx.runtime import denormals_flushed, session

BLOCKED_DOMAIN = "com.microsoft.nchwc"
CONV_OPS = {"Conv", "FusedConv"}
REORDERS = {"ReorderInput", "ReorderOutput"}


@dataclass
class Layout:
    """Convs of one model in onnxruntime's optimised graph."""

    convs: int  # conv nodes (BatchNorms run as 1x1 blocked convs count too)
    blocked: int  # of them in the blocked NCHWc layout
    reorders: int  # layout copies inserted
    plain: list[str] = field(default_factory=list)  # convs left in NCHW (module or node name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def module_names(model: onnx.ModelProto) -> dict[str, str]:
    """Conv node name -> the torch module it came from: its weight's name (``<module>.weight``)
    or else the scope torch's exporter recorded (which names a BatchNorm folded into it)."""
    names = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        if len(node.input) > 1 and node.input[1].endswith(".weight"):
            names[node.name] = node.input[1].removesuffix(".weight")
            continue
        scopes = next(
            (p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), ""
        )
        try:  # a Python list literal: ['', 'features', 'features.0', 'conv2d']
            path = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        if isinstance(path, list) and len(path) >= 2 and path[-2]:
            names[node.name] = str(path[-2])
    return names


def layout_of(model: onnx.ModelProto, names: dict[str, str] | None = None) -> Layout:
    """Count the blocked and plain convs and the reorders of an optimised graph; plain convs
    are named by ``names`` (node name -> module) where it knows them."""
    convs = blocked = reorders = 0
    plain = []
    for node in model.graph.node:
        if node.domain == BLOCKED_DOMAIN and node.op_type in REORDERS:
            reorders += 1
        elif node.op_type in CONV_OPS:
            convs += 1
            if node.domain == BLOCKED_DOMAIN:
                blocked += 1
            else:
                plain.append((names or {}).get(node.name, node.name))
    return Layout(convs, blocked, reorders, plain)


@denormals_flushed
def measure_layout(path: str | Path, threads: int = 2) -> Layout:
    """Let onnxruntime optimise the model at ``path`` for this CPU and read its layout."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, threads, optimized)
        names = module_names(onnx.load(str(path), load_external_data=False))
        return layout_of(onnx.load(str(optimized), load_external_data=False), names)


def layout_line(original: Layout, pruned: Layout) -> str:
    """One line, original -> pruned, as the export report prints it."""
    return (
        f"onnxruntime layout: blocked convs {original.blocked}/{original.convs} -> "
        f"{pruned.blocked}/{pruned.convs}, reorders {original.reorders} -> {pruned.reorders}"
    )


def layout_warning(original: Layout, pruned: Layout) -> str | None:
    """What the pruned model lost against the original, with the fix; None if nothing."""
    extra_plain = len(pruned.plain) - len(original.plain)
    extra_reorders = pruned.reorders - original.reorders
    if extra_plain <= 0 and extra_reorders <= 0:
        return None
    return (
        f"{max(extra_plain, 0)} more conv(s) outside onnxruntime's blocked layout and "
        f"{max(extra_reorders, 0)} more layout reorder(s) than the original (e.g. "
        f"{', '.join(pruned.plain[:3]) or 'reorders only'}): widths that are not whole SIMD "
        "blocks cost speed; plan with round_to='auto' (the default)"
    )
