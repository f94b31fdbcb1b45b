"""Pruning language models larger than memory: checkpoint in, checkpoint out.

1. Writes a checkpoint of LLaMA-3.1-8B's shape (hidden 4096, 32 layers, 32/8 heads, FFN 14336,
   vocab 128256; bf16, random init N(0, 0.02), 16 GB) to ``--src`` once, one decoder layer per
   shard, generated tensor by tensor (the model is never in memory).
2. ``graphprune.compile_checkpoint(src, Plan(ratio=0.25), dst)`` in a subprocess: seconds per
   stage and the peak resident memory above the process's size after its imports (its
   high-water mark reset then, Linux ``clear_refs``), and the raw ``ru_maxrss``.
3. The pruned checkpoint is loaded with ``from_pretrained`` (bf16) in another subprocess and
   generates 8 tokens greedily.
``--refit``: half the attention heads removed with ``reconstruct=True`` (each o_proj
refit to the original's outputs, the original and the pruned model streamed side by side).
``--sparsegpt --offload DIR``: 2:4 SparseGPT on the same calibration batches (a sequence each)
stacked into one forward and with ``offload_dir=DIR`` (a forward per batch, block inputs in
files), each in a subprocess: time, peak, and the two outputs compared tensor by tensor.
``--in-memory`` instead: the 1.1 B LLaMA-style model of the compile-time benchmark (bf16, random
init) compiled with ``graphprune.compile(..., Plan(ratio=0.25), inplace=True)`` in a
subprocess: seconds and peak resident size per stage (the high-water mark read and reset at
each stage's end), and the compile's peak over an idle process's size (a separate process with
the same imports and modelling code) as a multiple of the weights; ``--against REV`` (repeatable)
measures graphprune as of those git revisions in the same run.

    .venv/bin/python benchmarks/llm_scale.py [--src /tmp/llama8b] [--scale 8b|1b] [--sparsegpt
        | --refit]
    .venv/bin/python benchmarks/llm_scale.py --src /tmp/llama1b --scale 1b --sparsegpt \
        --calibration 16x1024 --offload /tmp/activations
    .venv/bin/python benchmarks/llm_scale.py --in-memory [--against 8f1a220 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# this folder holds transformers.py (a benchmark): it must not shadow the library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from graphprune.io import write_text_atomic  # noqa: E402 (after the path is set)
from graphprune.models.llm import LLAMA_SHAPES  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))
from compile_time import built_revision  # noqa: E402

SHAPES = {k: LLAMA_SHAPES[k] for k in ("8b", "1b")}

PRELUDE = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.append({root!r})  # after graphprune's own install (--against: another revision)
    from tests.real_models import declare_torchvision_ops
    declare_torchvision_ops()
    import torch, transformers
    import graphprune as gp
    transformers.logging.set_verbosity_error()

    def status(key):  # KiB
        return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))

    def reset():  # the high-water mark from here on (after imports / building)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")
    """
)

COMPILE = PRELUDE + textwrap.dedent(
    """
    base = reset()
    start = time.perf_counter()
    found = gp.compile_checkpoint(sys.argv[1], gp.Plan(ratio=0.25), sys.argv[2],
                                  verify_bytes=0, progress=False)
    print(json.dumps({{"seconds": time.perf_counter() - start, "stages": found.seconds,
        "peak_gib": (status("VmHWM") - base) / 2**20, "base_gib": base / 2**20,
        "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "params": [found.params_before, found.params_after], "verified": found.verified,
        "config": found.config.changes if found.config else None,
        "synced": bool(found.config and found.config.expressible)}}))
    """
)

SPARSEGPT = PRELUDE + textwrap.dedent(
    """
    import statistics, sysconfig
    from pathlib import Path
    # N calibration sequences of L tokens: bytes of the standard library's sources as ids
    n, length = map(int, sys.argv[3].split("x"))
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = b"".join(p.read_bytes() for p in files)[: n * length]
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long().reshape(n, length)
    # stacked: one batch of N -- SparseGPT's Hessian is one float32 product per batch (summed
    # in double, so a process's share of the batches sums the same products); one large
    # product is fast. Offloaded (or --per-sequence): a batch per sequence
    per_sequence = sys.argv[4] != "-" or sys.argv[5] == "per-sequence"
    calibration = [(row[None],) for row in ids] if per_sequence else [(ids,)]
    plan = gp.Plan(granularity="n:m", nm=[2, 4], reconstruct=True, ignore=["lm_head"])
    base = reset()
    start = time.perf_counter()
    found = gp.compile_checkpoint(sys.argv[1], plan, sys.argv[2], calibration=calibration,
                                  verify_bytes=0, progress=False,
                                  offload_dir=None if sys.argv[4] == "-" else sys.argv[4])
    fits = [f for f in found.fits if f.method == "sparsegpt"]
    masked = [m for m in found.sparsity if m.pattern != "dense"]
    print(json.dumps({{"seconds": time.perf_counter() - start, "stages": found.seconds,
        "peak_gib": (status("VmHWM") - base) / 2**20, "base_gib": base / 2**20,
        "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "layers": len(masked), "sparsity": statistics.mean(m.sparsity for m in masked),
        "sparsegpt_layers": len(fits),
        "error_before": statistics.median(f.error_before for f in fits),
        "error_after": statistics.median(f.error_after for f in fits),
        "verified": found.verified}}))
    """
)

REFIT = PRELUDE + textwrap.dedent(
    """
    import statistics, sysconfig
    from pathlib import Path
    # 16 x 256 calibration tokens (the SparseGPT run's): one batch, its halves the two folds
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = b"".join(p.read_bytes() for p in files)[: 16 * 256]
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long().reshape(16, 256)
    # half the heads: LlamaConfig accepts only head counts that divide hidden_size (24 of 32
    # heads at hidden 2048 is refused)
    plan = gp.Plan(ratio=0.5, granularity="heads", reconstruct=True)
    base = reset()
    start = time.perf_counter()
    found = gp.compile_checkpoint(sys.argv[1], plan, sys.argv[2], calibration=[(ids,)],
                                  verify_bytes=0, progress=False)
    fits = [f for f in found.fits if f.method == "least squares"]
    print(json.dumps({{"seconds": time.perf_counter() - start, "stages": found.seconds,
        "peak_gib": (status("VmHWM") - base) / 2**20, "base_gib": base / 2**20,
        "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "params": [found.params_before, found.params_after], "refit_layers": len(fits),
        "error_before": statistics.median(f.error_before for f in fits),
        "error_after": statistics.median(f.error_after for f in fits),
        "config": found.config.changes if found.config else None,
        "verified": found.verified}}))
    """
)

GENERATE = PRELUDE + textwrap.dedent(
    """
    start = time.perf_counter()
    model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    loaded = time.perf_counter() - start
    seeded = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=seeded)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    print(json.dumps({{"load_s": loaded, "generate_s": time.perf_counter() - start - loaded,
        "tokens": out[0, 8:].tolist(), "params": sum(p.numel() for p in model.parameters())}}))
    """
)

IN_MEMORY = PRELUDE + textwrap.dedent(
    """
    sys.path.append({root!r} + "/benchmarks")
    from compile_time import llama_1b
    model, inputs = llama_1b()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    peaks = {{}}  # stage -> its peak resident size, KiB
    try:  # each stage's peak: the high-water mark read and reset when the stopwatch laps
        from graphprune.stages.context import Stopwatch
        lap = Stopwatch.lap

        def measured(self, stage):
            peaks[stage] = max(peaks.get(stage, 0), status("VmHWM"))
            reset()
            lap(self, stage)

        Stopwatch.lap = measured
    except ImportError:  # a revision without this stopwatch: the whole compile's peak only
        pass
    model_kib = reset()
    start = time.perf_counter()
    pruned = gp.compile(model, gp.Plan(ratio=0.25), inputs, inplace=True)
    seconds = time.perf_counter() - start
    peaks["the rest"] = status("VmHWM")  # the check's forward, config sync, report
    print(json.dumps({{"seconds": seconds, "stages": gp.report(pruned).seconds,
        "weights_gib": weights, "model_gib": model_kib / 2**20,
        "peak_gib": max(peaks.values()) / 2**20,
        "stage_peak_gib": {{k: v / 2**20 for k, v in peaks.items()}}}}))
    """
)

# the in-memory run's baseline: the same imports and modelling code, no weights to speak of
IDLE = PRELUDE + textwrap.dedent(
    """
    sys.path.append({root!r} + "/benchmarks")
    import compile_time
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    tiny = transformers.LlamaForCausalLM(config).bfloat16().eval()
    print(json.dumps({{"idle_gib": status("VmRSS") / 2**20}}))
    """
)


def write_checkpoint(path: Path, scale: str) -> None:
    """The checkpoint of ``scale``'s shape, tensor by tensor (random N(0, 0.02), norms 1)."""
    import torch
    from safetensors.torch import save_file

    from tests.real_models import declare_torchvision_ops

    declare_torchvision_ops()  # transformers imports torchvision
    import transformers as tf

    config = tf.LlamaConfig(**SHAPES[scale], max_position_embeddings=8192, dtype="bfloat16")
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    staging = path.with_name(path.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    layers: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[1:2] == ["layers"] else "rest"
        layers.setdefault(key, []).append(name)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, (key, names) in enumerate(layers.items()):
        file = f"model-{i + 1:05d}-of-{len(layers):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = torch.empty(shapes[name], dtype=torch.bfloat16)
                tensors[name] = t.normal_(0.0, 0.02, generator=generator)
            weight_map[name] = file
        save_file(tensors, str(staging / file), metadata={"format": "pt"})
        print(f"  wrote {file} ({key})", flush=True)
    index = {"metadata": {}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(staging))
    staging.rename(path)


def run(script: str, *args: str, site: Path | None = None) -> dict[str, Any]:
    """``script`` in a fresh interpreter; its last line of output, as JSON. ``site``: the
    graphprune of another revision, put before this checkout's."""
    env = {**os.environ, "PYTHONPATH": str(site)} if site else None
    out = subprocess.run(
        [sys.executable, "-c", script.format(root=str(ROOT)), *args],
        capture_output=True, text=True, env=env, cwd=site.parent if site else None,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"subprocess failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def compare_checkpoints(one: Path, two: Path) -> dict[str, Any]:
    """Tensor by tensor: how many are identical, how many have the same zeros, the share of
    all weights whose zero/non-zero agrees, the largest difference."""
    import torch
    from safetensors import safe_open

    index = json.loads((one / "model.safetensors.index.json").read_text())["weight_map"]
    other = json.loads((two / "model.safetensors.index.json").read_text())["weight_map"]
    same = masks = agree = total = 0
    gap = 0.0
    for name, file in index.items():
        with safe_open(str(one / file), "pt") as a, safe_open(str(two / other[name]), "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        same += int(torch.equal(x, y))
        masks += int(torch.equal(x == 0, y == 0))
        agree, total = agree + int(((x == 0) == (y == 0)).sum()), total + x.numel()
        gap = max(gap, float((x.float() - y.float()).abs().max()))
    return {"tensors": len(index), "identical": same, "same_zeros": masks,
            "zeros_agree": agree / total, "max_diff": gap}  # fmt: skip


def offload_comparison(src: Path, calibration: str, folder: Path) -> dict[str, Any]:
    """2:4 SparseGPT from ``src`` on the same calibration batches (a sequence each), stacked
    into one forward and offloaded to ``folder``: time, peak and the two outputs compared."""
    results: dict[str, Any] = {}
    for mode, offload in (("stacked", "-"), ("offloaded", str(folder))):
        dst = src.with_name(f"{src.name}-24-{mode}")
        shutil.rmtree(dst, ignore_errors=True)
        results[mode] = run(SPARSEGPT, str(src), str(dst), calibration, offload, "per-sequence")
        found = results[mode]
        print(f"  {mode:10s} {found['seconds']:7.0f} s, peak {found['peak_gib']:.2f} GiB over "
              f"{found['base_gib']:.2f} GiB after imports (ru_maxrss {found['maxrss_gib']:.2f} "
              f"GiB); SparseGPT median layer error {found['error_before']:.4f} -> "
              f"{found['error_after']:.4f}", flush=True)  # fmt: skip
    one, two = (src.with_name(f"{src.name}-24-{m}") for m in ("stacked", "offloaded"))
    results["compared"] = found = compare_checkpoints(one, two)
    print(f"  outputs: {found['identical']} of {found['tensors']} tensors identical, "
          f"{found['same_zeros']} with the same zeros ({100 * found['zeros_agree']:.2f} % of "
          f"all weights agree on zero or not), largest difference "
          f"{found['max_diff']:.3g}")  # fmt: skip
    for path in (one, two):
        shutil.rmtree(path, ignore_errors=True)
    return results


def in_memory(site: Path | None = None) -> dict[str, Any]:
    """The 1.1 B compile in memory, its peak over an idle process as a multiple of the weights."""
    found = run(IN_MEMORY, site=site)
    found["idle_gib"] = run(IDLE, site=site)["idle_gib"]
    found["peak_x_weights"] = (found["peak_gib"] - found["idle_gib"]) / found["weights_gib"]
    return found


def print_in_memory(results: dict[str, dict[str, Any]]) -> None:
    """Seconds and peak resident GiB (over the idle process) per stage, one column per run."""
    names = list(results)
    stages = list(dict.fromkeys(k for r in results.values() for k in r["stages"]))
    stages += ["the rest"]
    print(f"{'stage':22s}" + "".join(f"{n:>22s}" for n in names))
    for stage in stages:
        cells = []
        for r in results.values():
            t = r["stages"].get(stage)
            g = r.get("stage_peak_gib", {}).get(stage)
            text = (f"{t:.1f} s" if t is not None else "-") + (
                f", {g - r['idle_gib']:.2f} GiB" if g is not None else ""
            )
            cells.append(f"{text:>22s}")
        print(f"{stage:22s}" + "".join(cells))
    print(f"{'total':22s}" + "".join(f"{r['seconds']:>20.1f} s" for r in results.values()))
    print(f"{'peak over idle / weights':22s}"
          + "".join(f"{r['peak_x_weights']:>21.2f}x" for r in results.values()))  # fmt: skip
    weights = next(iter(results.values()))["weights_gib"]
    print(
        f"(weights {weights:.2f} GiB; an idle process with the same imports: "
        f"{next(iter(results.values()))['idle_gib']:.2f} GiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="/tmp/graphprune-llama8b")
    parser.add_argument("--scale", choices=sorted(SHAPES), default="8b")
    parser.add_argument(
        "--in-memory", action="store_true", help="the 1.1 B compiled in memory, instead"
    )
    parser.add_argument("--against", action="append", default=[], help="with --in-memory")
    parser.add_argument(
        "--sparsegpt",
        action="store_true",
        help="2:4 SparseGPT (16 x 256 calibration tokens) instead of structured",
    )
    parser.add_argument(
        "--calibration", default="16x256", help="with --sparsegpt: N sequences x L tokens"
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="50%% of the attention heads removed and o_proj refit (reconstruct=True) on "
        "16 x 256 calibration tokens, instead of structured",
    )
    parser.add_argument(
        "--offload",
        metavar="DIR",
        help="with --sparsegpt: run it stacked and with offload_dir=DIR on the same batches "
        "(a sequence each), and compare",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.in_memory:
        results["in_memory_1b"] = {"this checkout": in_memory()}
        for ref in args.against:
            with built_revision(ref) as site:
                results["in_memory_1b"][ref] = in_memory(site)
        print("graphprune.compile of the 1.1 B LLaMA shape in memory (bf16, ratio 0.25, inplace)")
        print_in_memory(results["in_memory_1b"])
        if args.out:
            write_text_atomic(Path(args.out), json.dumps(results, indent=1))
        return
    src = Path(args.src)
    if not src.exists():
        start = time.perf_counter()
        write_checkpoint(src, args.scale)
        print(f"wrote {src} in {time.perf_counter() - start:.0f} s")
    dst = src.with_name(src.name + ("-24" if args.sparsegpt else "-refit" if args.refit
                                    else "-pruned"))  # fmt: skip
    shutil.rmtree(dst, ignore_errors=True)
    if args.sparsegpt and args.offload:
        print(f"compile_checkpoint {args.scale} 2:4 SparseGPT ({args.calibration} tokens, a "
              "batch per sequence, lm_head dense):")  # fmt: skip
        results["offload"] = offload_comparison(src, args.calibration, Path(args.offload))
        if args.out:
            write_text_atomic(Path(args.out), json.dumps(results, indent=1))
        return
    if args.sparsegpt:
        results["sparsegpt_2_4"] = found = run(SPARSEGPT, str(src), str(dst), args.calibration,
                                               "-", "stacked")  # fmt: skip
        print(
            f"compile_checkpoint {args.scale} 2:4 SparseGPT ({args.calibration} tokens, lm_head "
            "dense): "
            f"{found['seconds']:.0f} s, peak {found['peak_gib']:.2f} GiB over "
            f"{found['base_gib']:.2f} GiB after imports (ru_maxrss {found['maxrss_gib']:.2f} "
            f"GiB); {found['layers']} layers at {found['sparsity']:.3f} zeros; SparseGPT "
            f"median layer error {found['error_before']:.4f} -> {found['error_after']:.4f}"
        )
    elif args.refit:
        results["refit_heads"] = found = run(REFIT, str(src), str(dst))
        print(
            f"compile_checkpoint {args.scale} heads 50% + reconstruct=True (16 x 256 tokens): "
            f"{found['seconds']:.0f} s, peak {found['peak_gib']:.2f} GiB over "
            f"{found['base_gib']:.2f} GiB after imports (ru_maxrss {found['maxrss_gib']:.2f} "
            f"GiB); params {found['params'][0] / 1e9:.2f} B -> {found['params'][1] / 1e9:.2f} "
            f"B; {found['refit_layers']} layers refit, median error {found['error_before']:.4f}"
            f" -> {found['error_after']:.4f}; config {found['config']}"
        )
    else:
        results["compile_checkpoint"] = found = run(COMPILE, str(src), str(dst))
        print(f"compile_checkpoint {args.scale} at ratio 0.25: {found['seconds']:.0f} s, peak "
              f"{found['peak_gib']:.2f} GiB over {found['base_gib']:.2f} GiB after imports "
              f"(ru_maxrss {found['maxrss_gib']:.2f} GiB); params "
              f"{found['params'][0] / 1e9:.2f} B -> {found['params'][1] / 1e9:.2f} B; config "
              f"{found['config']} synced={found['synced']}")  # fmt: skip
    print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in found["stages"].items()))
    results["generate"] = loaded = run(GENERATE, str(dst))
    print(f"from_pretrained(pruned): {loaded['load_s']:.0f} s, {loaded['params'] / 1e9:.2f} B "
          f"params; 8 greedy tokens in {loaded['generate_s']:.1f} s")  # fmt: skip
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
