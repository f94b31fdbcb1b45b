"""A pruned (and masked) model trains under DistributedDataParallel: 2 CPU processes, gloo."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import graphprune as gp
from graphprune.models import MODELS

PLAN = gp.Plan(ratio=0.5, sparsity=gp.Plan(granularity="unstructured", ratio=0.5))
STEPS = 3


def _pruned() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    spec = MODELS["resnet18"]
    x = spec.example_inputs()
    return gp.compile(spec.build(seed=0), PLAN, x), x  # deterministic: same on every rank


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 * rank + step))


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model, _ = _pruned()
        model.train()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for step in range(STEPS):
            opt.zero_grad()
            _loss(ddp, _batch(rank, step)).backward()  # gradients all-reduced (averaged)
            opt.step()
        torch.save(
            {n: p.detach() for n, p in model.named_parameters()}, Path(out) / f"rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pruned_masked_model_trains_under_ddp(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]:  # replicas stayed identical
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    # the same training in one process: averaging the two ranks' losses = DDP's mean gradient
    model, _ = _pruned()
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        opt.zero_grad()
        ((_loss(model, _batch(0, step)) + _loss(model, _batch(1, step))) / 2).backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[0][name], p.detach(), atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(start[n], ranks[0][n]) for n in start)  # it did train
    for name, mask in gp.masked_layers(model).items():  # and masks held under DDP: the
        original = ranks[0][f"{name}.parametrizations.weight.original"]  # hidden values too
        assert bool((original[~mask] == 0).all()) and bool((original[mask] != 0).any())
