"""Group-lasso sparsity regularization before structured pruning.

For every prunable group, each channel's weights across *all* coupled members (the conv that
produces it, the BatchNorm that scales it, the convs that consume it, ...) form one vector; the
penalty is the sum over channels of those vectors' L2 norms. Added to the training loss it drives
whole coupled channels toward zero together, so the pruning that follows removes channels that
carry little (Wen et al. 2016; DepGraph's "sparse training").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphprune.analysis import analyze
from graphprune.capture import ExampleInputs
from graphprune.planning.plan import Plan
from graphprune.planning.resolve import eligible_groups


class GroupLasso(nn.Module):
    """``penalty = strength * sum_groups sum_channels ||w_channel||_2`` of a model's groups.

    Build once (it analyses the model), then call ``reg(model)`` inside the training loop and
    add the result to the loss. The model's parameters are looked up by name at each call, so
    it follows the optimizer's updates (and DistributedDataParallel's ``.module``).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        *,
        strength: float = 1e-4,
        plan: Plan | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        plan = plan or Plan(ratio=0.5)
        dg = analyze(model, example_inputs)
        modules = dict(model.named_modules())
        self.strength, self.eps = strength, eps
        # per group: (size, [(fqn, dim, position indices, channel indices)])
        self.groups: list[tuple[int, list[tuple[str, int, Tensor, Tensor]]]] = []
        for g in eligible_groups(dg, plan, modules):
            members = []
            for m in g.members:
                if not m.is_parameter:
                    continue  # running statistics are not trained
                positions = torch.from_numpy((m.index_map >= 0).nonzero()[0])
                channels = torch.from_numpy(m.index_map[m.index_map >= 0])
                members.append((m.fqn, m.dim, positions, channels))
            if members:
                self.groups.append((g.size, members))

    def forward(self, model: nn.Module) -> Tensor:
        params = dict(model.named_parameters())
        norms = [
            (self._squares(params, size, members) + self.eps).sqrt().sum()
            for size, members in self.groups
        ]
        return self.strength * torch.stack(norms).sum() if norms else torch.zeros(())

    def channel_norms(self, model: nn.Module) -> list[Tensor]:
        """Each group's per-channel L2 norms (detached), e.g. to watch channels die."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            return [self._squares(params, size, m).sqrt() for size, m in self.groups]

    @staticmethod
    def _squares(
        params: dict[str, nn.Parameter], size: int, members: list[tuple[str, int, Tensor, Tensor]]
    ) -> Tensor:
        """(size,) sum of squared weights of each channel over every member."""
        first = params[members[0][0]]
        squares = torch.zeros(size, dtype=first.dtype, device=first.device)
        for fqn, dim, positions, channels in members:
            w = params[fqn].movedim(dim, 0)  # (positions, ...)
            per_position = w.reshape(w.shape[0], -1).pow(2).sum(1)  # (positions,)
            squares = squares.index_add(
                0, channels.to(w.device), per_position[positions.to(w.device)]
            )
        return squares
