"""Exceptions raised by graphprune. Each names what failed and suggests a fix."""

from __future__ import annotations


class GraphPruneError(Exception):
    """Base class of every graphprune error."""


class CaptureError(GraphPruneError):
    """The model could not be captured to a graph by ``torch.export``."""

    def __init__(self, reason: str, *, source_line: str | None = None, hint: str) -> None:
        self.reason = reason
        self.source_line = source_line
        self.hint = hint
        parts = [f"could not capture the model: {reason}"]
        if source_line:
            parts.append(f"  at {source_line}")
        parts.append(f"  hint: {hint}")
        super().__init__("\n".join(parts))


class AnalysisError(GraphPruneError):
    """The dependency analysis hit an inconsistency it cannot resolve safely."""


class InputError(GraphPruneError, ValueError):
    """Bad arguments from the caller (unknown layer name, malformed inputs, ...)."""
