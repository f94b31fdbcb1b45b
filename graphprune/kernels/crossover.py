"""Measured crossover: is a sparse kernel faster than dense for *this* weight, here?

Whether CSR beats a dense GEMM depends on the shape, the number of rows, the sparsity and its
pattern, the CPU and the thread count (the crossover moves with each; the README's sparsity
section has measurements). So graphprune does not use a fixed threshold:
it times dense and every applicable sparse layout on the layer's real weight and row count,
interleaved, and keeps the median.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from graphprune.kernels.sparse_modules import sparse_matmul, to_sparse
from graphprune.timing import interleaved_samples


@dataclass
class KernelTimes:
    """Median µs of one (R, in) x (out, in)^T product per layout, for R = ``rows``."""

    rows: int
    micros: dict[str, float]  # "dense", "csr", "bsr", ...

    @property
    def best(self) -> str:
        return min(self.micros, key=lambda k: self.micros[k])

    def speedup(self, layout: str) -> float:
        return self.micros["dense"] / self.micros[layout]


def square_block(weight: Tensor, sizes: tuple[int, ...] = (32, 16, 8, 4)) -> int | None:
    """The largest square block size b such that ``weight``'s nonzeros sit in few b x b
    blocks (kept blocks are at most 1.5x the density: a block mask), or None. BSR on CPU
    (MKL) needs square blocks; for unstructured zeros almost every block holds a nonzero."""
    out, inp = weight.shape
    nonzero = weight != 0
    for b in sizes:
        if out % b or inp % b:
            continue
        blocks = nonzero.reshape(out // b, b, inp // b, b).any(dim=3).any(dim=1)  # (out/b, in/b)
        if float(blocks.float().mean()) <= 1.5 * float(nonzero.float().mean()):
            return b
    return None


def time_layouts(
    weight: Tensor, rows: int, layouts: list[str], *, repeats: int = 25, blocksize: int | None
) -> KernelTimes:
    """Interleaved timing of dense ``F.linear`` and each sparse layout on ``weight`` (out, in)."""
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    kernels: dict[str, Callable[[], Tensor]] = {
        "dense": lambda: torch.nn.functional.linear(x, weight)
    }
    for layout in layouts:
        sparse = to_sparse(weight, layout, blocksize)
        kernels[layout] = functools.partial(sparse_matmul, sparse, x, layout)
    sync = torch.cuda.synchronize if weight.is_cuda else None
    with torch.no_grad():  # 2 warm-up rounds: MKL handles, page faults
        samples = interleaved_samples(kernels, warmup=2, repeats=repeats, sync=sync)
    return KernelTimes(rows, {k: statistics.median(v) * 1e6 for k, v in samples.items()})
