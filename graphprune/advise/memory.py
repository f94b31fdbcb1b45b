"""Memory a runtime needs to load and run a model, measured in a fresh process.

RSS growth inside a long-lived process says little: allocators keep what earlier sessions
freed, so a second session can look free and a third can look huge. Each measurement here is
a child process that imports the runtime, reads the inputs, loads the file and runs it once;
its peak RSS (``VmHWM``; ``ru_maxrss`` where there is no /proc) minus that of a child
that loads and runs a one-op model (the runtime's fixed cost: its CPU plugin, thread pools)
is the model's memory at session start. The child imports only numpy and the runtime (not
torch, not graphprune: seconds per candidate otherwise), configured as
:mod:`graphprune.onnx.runtimes` configures it for timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphprune.onnx.runtimes import openvino_config

# argv: runtime, model file, feeds (.npz), runtime config (JSON)
_PROBE = """
import json, resource, sys
import numpy as np
runtime, file, feeds, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
data = dict(np.load(feeds))
if runtime == "onnxruntime":
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = config["threads"]
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
    sess.run(None, data)
else:
    import openvino as ov
    request = ov.Core().compile_model(file, "CPU", config).create_infer_request()
    request.infer(data)
def peak_kib():
    # VmHWM: this process image's peak RSS. ru_maxrss would do elsewhere, but Linux carries
    # it over exec from the parent, so a child of a 600 MB process starts at 600 MB.
    try:
        with open("/proc/self/status") as status:
            return int(next(l.split()[1] for l in status if l.startswith("VmHWM:")))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(peak_kib())
"""


class MemoryProbe:
    """Peak memory of loading and running files on one runtime, less an idle process's."""

    def __init__(self, runtime: str, feeds: dict[str, np.ndarray], threads: int) -> None:
        self.runtime = runtime
        config = openvino_config(threads) if runtime == "openvino" else {"threads": threads}
        self._config = json.dumps(config)
        self._dir = tempfile.TemporaryDirectory(prefix="graphprune-memory-")
        self._feeds = Path(self._dir.name) / "feeds.npz"
        np.savez(self._feeds, **feeds)  # type: ignore[arg-type]  # numpy's stub misses **arrays
        self._idle_kib: int | None = None

    def _idle_files(self) -> tuple[Path, Path]:
        """A one-op model (Relu on 1 float) and its feed: what the runtime costs by itself."""
        folder = Path(self._dir.name)
        model_path, feeds_path = folder / "idle.onnx", folder / "idle.npz"
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "idle", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # readable by every runtime release this supports
        onnx.save(model, model_path)
        np.savez(feeds_path, x=np.zeros(1, np.float32))
        return model_path, feeds_path

    def _peak_kib(self, file: Path, feeds: Path) -> int:
        args = [self.runtime, str(file), str(feeds), self._config]
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            reason = " ".join(done.stderr.split())[-300:]
            raise RuntimeError(f"{self.runtime} memory probe of {file} failed: {reason}")
        return int(done.stdout.split()[-1])

    def memory_mb(self, file: Path) -> float:
        """MB the runtime holds once ``file`` is loaded and has run once (peak RSS)."""
        if self._idle_kib is None:
            self._idle_kib = self._peak_kib(*self._idle_files())
        return max(0, self._peak_kib(file, self._feeds) - self._idle_kib) / 1024

    def close(self) -> None:
        self._dir.cleanup()
