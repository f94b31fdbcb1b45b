"""Channel atoms: the unit the dependency analyzer reasons about.

Every dimension of every tensor in the captured graph is described by an array of *atom ids*,
one per position along that dimension. Two positions that must be removed together (the same
channel seen by two layers) hold atoms in the same union-find class. A reshape that factors a
dimension (``C -> heads x head_dim``, ``C*H*W <- C, H, W``) makes *composite* atoms: the atom
at position ``h * hd + d`` is ``pair(H[h], D[d])``, and it is removed when either factor is.

Classes that are not composite are *base* channels; base channels are grouped by the *space*
they were created in (a parameter dimension, a factor of a reshape, ...), and spaces merge
when any of their atoms merge. A dependency group is one merged space.

Invariant kept by :meth:`AtomTable.union`: when two composite classes merge, their factors
merge too (a channel ``(h, d)`` equal to ``(h', d')`` forces ``h ~ h'`` and ``d ~ d'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Atoms = np.ndarray  # 1-D int64 array of atom ids, one per position along a tensor dimension


@dataclass
class AtomTable:
    """Union-find over atoms (channels) and over the spaces that created them."""

    parent: list[int] = field(default_factory=list)
    space_of: list[int] = field(default_factory=list)
    space_parent: list[int] = field(default_factory=list)
    space_label: list[str] = field(default_factory=list)
    pair: dict[int, tuple[int, int]] = field(default_factory=dict)  # root -> (left, right)

    # -- creation ---------------------------------------------------------------------------
    def new_space(self, size: int, label: str) -> Atoms:
        """Allocate ``size`` fresh atoms in a new space (one per channel)."""
        space = len(self.space_parent)
        self.space_parent.append(space)
        self.space_label.append(label)
        start = len(self.parent)
        self.parent.extend(range(start, start + size))
        self.space_of.extend([space] * size)
        return np.arange(start, start + size, dtype=np.int64)

    # -- union-find -------------------------------------------------------------------------
    def find(self, atom: int) -> int:
        parent = self.parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:  # path compression
            parent[atom], atom = root, parent[atom]
        return root

    def find_space(self, space: int) -> int:
        parent = self.space_parent
        root = space
        while parent[root] != root:
            root = parent[root]
        while parent[space] != root:
            parent[space], space = root, parent[space]
        return root

    def union(self, a: int, b: int) -> None:
        """Merge the classes of ``a`` and ``b`` (and, recursively, the factors of composites)."""
        work = [(a, b)]
        while work:
            x, y = work.pop()
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            if ry < rx:  # the older atom stays root: channel order follows creation order
                rx, ry = ry, rx
            self.parent[ry] = rx
            sx, sy = self.find_space(self.space_of[rx]), self.find_space(self.space_of[ry])
            if sx != sy:
                self.space_parent[max(sx, sy)] = min(sx, sy)
            py = self.pair.pop(ry, None)
            if py is not None:
                px = self.pair.get(rx)
                if px is None:
                    self.pair[rx] = py
                else:
                    work.append((px[0], py[0]))
                    work.append((px[1], py[1]))

    def union_arrays(self, xs: Atoms, ys: Atoms) -> None:
        """Merge position-wise: ``xs[i] ~ ys[i]`` (shapes must match)."""
        if xs.shape != ys.shape:
            raise ValueError(f"cannot couple dims of sizes {xs.shape[0]} and {ys.shape[0]}")
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            if x != y:
                self.union(x, y)

    def set_pair(self, atom: int, left: int, right: int) -> None:
        """Declare ``atom`` to be the composite channel ``(left, right)``."""
        root = self.find(atom)
        existing = self.pair.get(root)
        if existing is None:
            self.pair[root] = (left, right)
        else:
            self.union(existing[0], left)
            self.union(existing[1], right)

    # -- structure --------------------------------------------------------------------------
    def factor(self, atoms: Atoms, sizes: list[int], label: str) -> list[Atoms]:
        """Split a dimension into ``sizes`` (row-major), returning one atom array per factor.

        Factors of size 1 get a fresh single atom and carry no information; when only one
        factor is larger than 1 it *is* the input dimension (no new atoms).
        """
        total = int(np.prod(sizes)) if sizes else 1
        if total != atoms.shape[0]:
            raise ValueError(f"cannot factor {atoms.shape[0]} positions into {sizes}")
        big = [i for i, s in enumerate(sizes) if s > 1]
        out: list[Atoms] = [self.new_space(1, f"{label}/unit") for _ in sizes]
        if len(big) == 1:
            out[big[0]] = atoms
        elif len(big) > 1:
            parts = self._factor_nested(atoms, [sizes[i] for i in big], label)
            for i, part in zip(big, parts, strict=True):
                out[i] = part
        return out

    def _factor_nested(self, atoms: Atoms, sizes: list[int], label: str) -> list[Atoms]:
        # (s0, s1, ..., sk) is nested as pair(s0, pair(s1, ... sk)): the same nesting merge() makes
        head = self.new_space(sizes[0], f"{label}/factor{len(sizes)}")
        rest_size = int(np.prod(sizes[1:]))
        if len(sizes) == 2:
            rest = self.new_space(rest_size, f"{label}/factor1")
            rest_parts = [rest]
        else:
            rest = self.new_space(rest_size, f"{label}/rest")
            rest_parts = self._factor_nested(rest, sizes[1:], label)
        for pos, atom in enumerate(atoms.tolist()):
            self.set_pair(atom, int(head[pos // rest_size]), int(rest[pos % rest_size]))
        return [head, *rest_parts]

    def merge(self, parts: list[Atoms], label: str) -> Atoms:
        """Flatten dimensions (row-major) into one, returning its composite atoms."""
        big = [p for p in parts if p.shape[0] > 1]
        if not big:
            return self.new_space(1, f"{label}/unit")
        if len(big) == 1:
            return big[0]
        rest = self.merge(big[1:], label)
        head = big[0]
        merged = self.new_space(head.shape[0] * rest.shape[0], f"{label}/merged")
        for pos, atom in enumerate(merged.tolist()):
            self.set_pair(atom, int(head[pos // rest.shape[0]]), int(rest[pos % rest.shape[0]]))
        return merged

    def base_of(self, atom: int, memo: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
        """The base (non-composite) classes a channel depends on, as roots."""
        root = self.find(atom)
        cached = memo.get(root)
        if cached is not None:
            return cached
        factors = self.pair.get(root)
        memo[root] = (root,)  # provisional: a (degenerate) cycle of pairs ends here
        if factors is None:
            return (root,)
        result = self.base_of(factors[0], memo) + self.base_of(factors[1], memo)
        memo[root] = result
        return result
