"""The runtimes an exported model is measured on, behind one interface.

A :class:`Runtime` loads an ONNX file into a :class:`Loaded` model (input names, ``run``) with a
given number of CPU threads, set up for honest numbers the same way in every runtime:
subnormal floats flushed (random-init weights make them; 10-100x slower on x86), fp32
arithmetic unless the file says otherwise (OpenVINO's CPU plugin would otherwise pick bf16 on
CPUs that have it, which changes the outputs), and no spinning thread pools where the runtime
allows turning them off (two live sessions timed A B A B would take each other's cores).

- ``onnxruntime``: the CPU execution provider (:mod:`graphprune.onnx.runtime`).
- ``openvino``: Intel's OpenVINO CPU plugin, reading the same ONNX file (an optional extra,
  ``pip install graphprune[openvino]``).

A runtime that is not installed is known by name and says so (:func:`available_runtimes`);
asking one to load a file it cannot read raises :class:`RuntimeLoadError` naming both.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from graphprune.errors import GraphPruneError, InputError
from graphprune.onnx.runtime import float_state_kept, session

Feeds = dict[str, np.ndarray]


class RuntimeLoadError(GraphPruneError):
    """A runtime could not load (or compile) an ONNX file."""


class RuntimeUnavailable(GraphPruneError):
    """A runtime graphprune knows is not installed in this environment."""


class Loaded(Protocol):
    """An ONNX model loaded in a runtime, ready to run."""

    input_names: list[str]

    def run(self, feeds: Feeds) -> list[np.ndarray]: ...


class Runtime(Protocol):
    name: str
    package: str  # the distribution that provides it (what to pip install)

    def available(self) -> bool: ...

    def version(self) -> str: ...

    def load(self, path: str | Path, threads: int) -> Loaded: ...


@dataclass
class _OrtModel:
    sess: ort.InferenceSession
    input_names: list[str]

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        return list(self.sess.run(None, feeds))


class OnnxRuntimeCPU:
    name = "onnxruntime"
    package = "onnxruntime"

    def available(self) -> bool:
        return True  # a dependency of graphprune

    def version(self) -> str:
        return str(ort.__version__)

    def load(self, path: str | Path, threads: int) -> Loaded:
        sess = session(path, threads)  # raises InputError for a file it cannot read
        return _OrtModel(sess, [i.name for i in sess.get_inputs()])


@dataclass
class _OpenVinoModel:
    request: Any  # openvino.InferRequest
    outputs: list[Any]
    input_names: list[str]

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        with float_state_kept():  # OpenVINO leaves FTZ/DAZ set on the calling thread
            result = self.request.infer(feeds)
        # copies: the request reuses its output buffers on the next call
        return [np.array(result[out], copy=True) for out in self.outputs]


def openvino_config(threads: int) -> dict[str, Any]:
    """The CPU plugin's settings for honest timing (JSON-able: memory probes reuse them)."""
    return {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",  # bf16 on CPUs with it would change outputs
        "PERFORMANCE_HINT": "LATENCY",  # one stream: one request at a time, as timed
        "CPU_DENORMALS_OPTIMIZATION": True,  # flush subnormals, as onnxruntime does
    }


class OpenVinoCPU:
    name = "openvino"
    package = "openvino"

    def available(self) -> bool:
        return importlib.util.find_spec("openvino") is not None

    def version(self) -> str:
        return importlib.metadata.version("openvino") if self.available() else "not installed"

    def load(self, path: str | Path, threads: int) -> Loaded:
        if not self.available():
            raise RuntimeUnavailable(
                "OpenVINO is not installed: pip install 'graphprune[openvino]' (or openvino)"
            )
        import openvino as ov  # optional extra: imported only when asked for

        config = openvino_config(threads)
        try:
            with float_state_kept():  # compiling sets FTZ/DAZ on this thread and leaves it
                compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # read or compile failure: unsupported op, bad file
            reason = " ".join(str(exc).split())[:400]
            raise RuntimeLoadError(
                f"{path}: OpenVINO {self.version()} cannot load it ({type(exc).__name__}: "
                f"{reason})"
            ) from None
        names = [port.get_any_name() for port in compiled.inputs]
        return _OpenVinoModel(compiled.create_infer_request(), list(compiled.outputs), names)


RUNTIMES: dict[str, Runtime] = {"onnxruntime": OnnxRuntimeCPU(), "openvino": OpenVinoCPU()}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name`` (see :data:`RUNTIMES`); an unknown name is an InputError."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise InputError(
            f"runtime {name!r} is not one graphprune measures on; use one of {sorted(RUNTIMES)}"
        ) from None


def available_runtimes(names: Sequence[str]) -> tuple[list[Runtime], dict[str, str]]:
    """The runtimes of ``names`` that are installed, and why each other one is skipped."""
    found, skipped = [], {}
    for name in names:
        runtime = get_runtime(name)
        if runtime.available():
            found.append(runtime)
        else:
            skipped[name] = f"not installed (pip install {runtime.package})"
    return found, skipped


def load_checked(runtime: Runtime, path: str | Path, threads: int) -> Loaded:
    """``runtime.load`` with every failure as a :class:`RuntimeLoadError` naming the file."""
    try:
        return runtime.load(path, threads)
    except (RuntimeLoadError, RuntimeUnavailable):
        raise
    except InputError as exc:
        raise RuntimeLoadError(f"{runtime.name}: {exc}") from None
