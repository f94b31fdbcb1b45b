"""One-shot compile across torch.distributed processes equals the one-process run.

Two gloo processes (CPU) each compile the same model with the same calibration list: each runs
its half of the batches, the statistics (input norms, refit normal equations, SparseGPT
Hessians) are summed over both, and the masks and refit weights must be those of one process
over all the batches (float summation order aside). Both ranks end with identical weights.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.errors import InputError
from graphprune.models.cnn import BasicBlock, ResNet
from graphprune.models.transformers import GPT

ROOT = Path(__file__).resolve().parents[1]
PLANS: dict[str, dict[str, Any]] = {
    "cnn wanda refit": {"ratio": 0.5, "importance": "wanda", "reconstruct": True, "round_to": 1},
    "gpt 2:4 sparsegpt": {"granularity": "n:m", "reconstruct": True},
    "gpt unstructured sparsegpt": {
        "granularity": "unstructured",
        "ratio": 0.6,
        "reconstruct": True,
    },
}
WORKER = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from tests.test_distributed import run
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{{store}}", rank=rank, world_size=2)
    try:
        torch.save(run(), sys.argv[3])
    finally:
        dist.destroy_process_group()
    """
)


def two_ranks(script: str, store: Path, argument: Callable[[int], str]) -> None:
    """``script`` (a WORKER) run as ranks 0 and 1 of a gloo group, both to success; its third
    argument per rank is ``argument(rank)``."""
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                script.format(root=str(ROOT)),
                str(rank),
                str(store),
                argument(rank),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert all(w.returncode == 0 for w in workers), errors


def _cases() -> dict[str, tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]]:
    torch.manual_seed(0)
    cnn = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    images = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    gp.recalibrate_norms(cnn, images)
    gpt = GPT(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64).eval()
    tokens = [torch.randint(0, 96, (4, 32)) for _ in range(4)]
    return {
        "cnn wanda refit": (cnn, torch.randn(2, 3, 32, 32), images),
        "gpt 2:4 sparsegpt": (gpt, torch.randint(0, 96, (2, 16)), tokens),
        "gpt unstructured sparsegpt": (gpt, torch.randint(0, 96, (2, 16)), tokens),
    }


def row_counter() -> tuple[list[int], Callable[..., None]]:
    """A forward pre-hook counting the rows (batch entries) a layer is run on, and its count:
    a closure, so that compile's copy of the model (deepcopy keeps functions) counts too."""
    seen = [0]

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen[0] += len(args[0])

    return seen, hook


def run() -> dict[str, dict[str, torch.Tensor]]:
    """Every case compiled in this process (distributed or not): the final weights, and the
    rows its forwards saw (a rank sees its share of the calibration batches)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, (model, x, calibration) in _cases().items():
        seen, count = row_counter()
        first = next(m for m in model.modules() if isinstance(m, nn.Embedding | nn.Conv2d))
        hook = first.register_forward_pre_hook(count)
        pruned = gp.compile(model, gp.Plan(**PLANS[name]), x, calibration=calibration)
        found[name] = {k: v.detach().clone() for k, v in gp.finalize(pruned).state_dict().items()}
        found[name]["rows seen"] = torch.tensor(seen[0])
        hook.remove()
    return found


def test_two_gloo_processes_give_the_one_process_masks_and_weights(tmp_path: Path) -> None:
    two_ranks(WORKER, tmp_path / "store", lambda rank: str(tmp_path / f"rank{rank}.pt"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    alone = run()
    for name, weights in alone.items():
        seen = [int(r[name].pop("rows seen")) for r in ranks]
        assert max(seen) < int(weights.pop("rows seen")), name  # each rank ran its share only
        for key, expected in weights.items():
            zero, one = ranks[0][name][key], ranks[1][name][key]
            assert torch.equal(zero, one), (name, key)  # every rank solved the same system
            if expected.is_floating_point() and key.endswith("weight"):
                assert torch.equal(zero == 0, expected == 0), (name, key)  # the same masks
            torch.testing.assert_close(zero, expected, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_a_gradient_criterion_is_refused_across_processes(tmp_path: Path) -> None:
    """taylor's gradients are not summed over ranks, and each rank would time its own latency
    rounds: both refused, not computed from one share."""
    script = WORKER.replace(
        "torch.save(run(), sys.argv[3])",
        "from tests.test_distributed import taylor_across_ranks; taylor_across_ranks()",
    )
    two_ranks(script, tmp_path / "store", lambda rank: "-")


def taylor_across_ranks() -> None:
    model, x, calibration = _cases()["cnn wanda refit"]
    with pytest.raises(InputError, match="not computed across processes"):
        gp.compile(model, gp.Plan(ratio=0.5, importance="taylor"), x, calibration=calibration)
    with pytest.raises(InputError, match="cannot be spread over a torch"):
        gp.compile(model, gp.Plan(target_latency=0.8), x)  # each rank would time its own


STREAMED = {
    "sparsegpt": gp.Plan(granularity="n:m", reconstruct=True),
    "wanda": gp.Plan(granularity="n:m", importance="wanda"),
    "refit": gp.Plan(ratio=0.5, reconstruct=True),
}


def stream_across_ranks(folder: str) -> dict[str, int]:
    """compile_checkpoint of ``folder``/src for each STREAMED plan into ``folder``/<plan>
    (every rank the same arguments); the calibration rows each rank's stream was given."""
    from tests.real_models import declare_torchvision_ops

    declare_torchvision_ops()  # transformers imports torchvision
    import graphprune.checkpoint as checkpoint
    from tests.test_checkpoint import _calibration

    rows: dict[str, int] = {}
    real, real_refit = checkpoint.stream_sparse, checkpoint.stream_refit

    def counting(*args: Any) -> Any:
        rows[name] = sum(int(batch[0].shape[0]) for batch in args[3])
        return real(*args)

    def counting_refit(*args: Any) -> Any:
        rows[name] = sum(int(batch[0].shape[0]) for batch in args[6])
        return real_refit(*args)

    checkpoint.stream_sparse = counting  # type: ignore[assignment]
    checkpoint.stream_refit = counting_refit  # type: ignore[assignment]
    try:
        for name, plan in STREAMED.items():
            found = gp.compile_checkpoint(
                Path(folder) / "src", plan, Path(folder) / name, calibration=_calibration(),
                progress=False,
            )  # fmt: skip
            assert found.verified.startswith("outputs"), found.verified  # checked on every rank
    finally:
        checkpoint.stream_sparse, checkpoint.stream_refit = real, real_refit
    return rows


def test_two_gloo_processes_stream_a_checkpoint_as_one_does(tmp_path: Path) -> None:
    """compile_checkpoint in a process group: each rank streams its half of the calibration
    batches with the Hessians / input norms / refit statistics summed over both; rank 0 writes
    the checkpoint once, and it holds the one-process run's masks and weights (float summation
    aside)."""
    import transformers as tf

    from tests.test_checkpoint import _calibration, _llama, _saved

    _saved(_llama(), tmp_path / "src")
    script = WORKER.replace(
        "torch.save(run(), sys.argv[3])",
        "from tests.test_distributed import stream_across_ranks\n"
        "    torch.save(stream_across_ranks(sys.argv[3]), sys.argv[3] + f'/rows{{rank}}.pt')",
    )
    two_ranks(script, tmp_path / "store", lambda rank: str(tmp_path))
    rows = [torch.load(tmp_path / f"rows{r}.pt") for r in (0, 1)]
    assert rows == [{"sparsegpt": 2, "wanda": 2, "refit": 2}] * 2  # each its 2 of 4 batches
    for name, plan in STREAMED.items():
        assert not (tmp_path / f"{name}.partial").exists()
        alone = tmp_path / f"{name}-alone"
        gp.compile_checkpoint(
            tmp_path / "src", plan, alone, calibration=_calibration(), progress=False
        )
        one = tf.LlamaForCausalLM.from_pretrained(alone).state_dict()
        two = tf.LlamaForCausalLM.from_pretrained(tmp_path / name).state_dict()
        for key, expected in one.items():
            assert torch.equal(two[key] == 0, expected == 0), (name, key)  # the same masks
            torch.testing.assert_close(two[key], expected, rtol=1e-4, atol=1e-6)
