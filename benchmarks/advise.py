"""``graphprune advise`` on three models of different kinds, on onnxruntime and OpenVINO.

(a) digits CNN: the ResNet-layout CNN of ``benchmarks/accuracy.py`` trained on scikit-learn's
    digits (3 x 16 x 16); quality = test accuracy (the user's ``evaluate``).
(b) byte-level GPT: the one-shot benchmark's GPT (4 layers, width 192, context 128) trained on
    the source files of Python's standard library; quality = validation perplexity (lower is
    better), 32 windows.
(c) torchvision ResNet-50, random init, 224 x 224, no data: quality = output fidelity (top-1
    agreement with the original on held-back calibration batches of random images).

Every candidate (int8; unstructured 50/75/90 % SparseGPT with compact storage; 2:4; the
sparsest + int8; structured at 75/50/35 % of the original's onnxruntime latency, wanda +
reconstruct; the middle one + int8) is exported, verified, and timed side by side with the
original on each runtime at batch 1 and 8, 2 threads. One run per model; each writes
``<model>.txt`` (tables, facts, recommendation), ``<model>.json`` and ``<model>.png`` into
``--out``.

    .venv/bin/python benchmarks/advise.py [--models digits,gpt,resnet50] [--out out/advise]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(ROOT))

from accuracy import digits, train  # noqa: E402
from oneshot import perplexity, stdlib_corpus, train_gpt, windows  # noqa: E402

from graphprune.advise import advise, plot_advice  # noqa: E402
from graphprune.io import write_text_atomic  # noqa: E402
from graphprune.models.cnn import BasicBlock, ResNet  # noqa: E402
from graphprune.models.transformers import GPT  # noqa: E402
from tests.real_models import declare_torchvision_ops  # noqa: E402

RUNTIMES = ("onnxruntime", "openvino")


def digits_case(args: argparse.Namespace) -> dict[str, Any]:
    data = digits()
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], widths=(32, 64, 128, 256))
    model = train(model, data, 20, 2e-3, seed=0)
    x_test, y_test = data[2], data[3]

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x_test).argmax(1) == y_test).float().mean())

    calib = list(data[0][:512].split(64))  # 8 batches of 64 training images; 2 held back
    return {"model": model, "x": data[0][:1], "calibration": calib, "evaluate": accuracy,
            "higher_is_better": True, "quality": "test accuracy"}  # fmt: skip


def gpt_case(args: argparse.Namespace) -> dict[str, Any]:
    train_bytes, val_bytes, _ = stdlib_corpus(12_000_000)
    torch.manual_seed(0)
    model = GPT(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=192)
    train_gpt(model, train_bytes, args.steps)
    val = windows(val_bytes, 32, 128, seed=123456)

    def val_perplexity(m: nn.Module) -> float:
        return perplexity(m, val)

    calib = list(windows(train_bytes, 80, 128, seed=999)[:, :-1].split(8))  # 10 x 8 windows
    return {"model": model, "x": val[:1, :-1], "calibration": calib, "evaluate": val_perplexity,
            "higher_is_better": False, "quality": "validation perplexity"}  # fmt: skip


def resnet50_case(args: argparse.Namespace) -> dict[str, Any]:
    declare_torchvision_ops()
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, 224, 224, generator=g) for _ in range(8)]  # 6 calibrate, 2 held
    return {"model": model, "x": torch.randn(1, 3, 224, 224, generator=g), "calibration": calib,
            "evaluate": None, "higher_is_better": True, "quality": "fidelity"}  # fmt: skip


CASES = {"digits": digits_case, "gpt": gpt_case, "resnet50": resnet50_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,gpt,resnet50")
    parser.add_argument("--steps", type=int, default=600, help="GPT training steps")
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default="out/advise")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        start = time.perf_counter()
        case = CASES[name](args)
        built = time.perf_counter() - start
        advice = advise(
            case["model"], (case["x"],), calibration=case["calibration"],
            evaluate=case["evaluate"], higher_is_better=case["higher_is_better"],
            runtimes=RUNTIMES, threads=2, budget_s=args.budget_s, runs=args.runs,
            batch_sizes=(1, 8), out=out / name,
        )  # fmt: skip
        header = (
            f"# benchmarks/advise.py --models {name} (one run; model built/trained in "
            f"{built:.0f} s, advise {advice.seconds:.0f} s; quality: {case['quality']})\n\n"
        )
        text = header + advice.table() + "\n"
        print(text, flush=True)
        write_text_atomic(out / f"{name}.txt", text)
        advice.save_json(out / f"{name}.json")
        plot_advice(advice, out / f"{name}.png", title=f"graphprune advise: {name}")


if __name__ == "__main__":
    main()
