"""compile_checkpoint: a save_pretrained checkpoint pruned into a new one without loading the
model -- built on meta, scored tensor by tensor, written layer by layer -- must give exactly
what graphprune.compile gives in memory, resume after an interruption, leave src untouched,
refuse bad input clearly, and stay within a memory bound tied to one layer."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import graphprune as gp
import graphprune.checkpoint.write as write_module
from graphprune.cli import main as cli_main
from graphprune.errors import InputError
from graphprune.planning.plan import PlanError

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]


def _llama(tied: bool = False, **sizes: int) -> Any:
    small = {
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }  # fmt: skip
    config = tf.LlamaConfig(**{**small, **sizes}, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def _saved(model: Any, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="60KB")  # several shards
    return path


def _loads_as(reference: torch.nn.Module, dst: Path) -> Any:
    """``dst`` loaded with from_pretrained: every weight that of ``reference``, bit for bit."""
    loaded = tf.LlamaForCausalLM.from_pretrained(dst).eval()
    want, have = reference.state_dict(), loaded.state_dict()
    assert want.keys() == have.keys()
    for key in want:
        assert torch.equal(want[key], have[key]), key
    return loaded


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


PLANS = [
    gp.Plan(ratio=0.5),
    gp.Plan(ratio=0.5, granularity="heads"),
    gp.Plan(ratio=0.25, importance="l1", round_to=8),
]


@pytest.mark.parametrize("plan", PLANS, ids=["channels", "heads", "l1-round8"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_streamed_equals_in_memory(tmp_path: Path, plan: gp.Plan, tied: bool) -> None:
    model = _llama(tied)
    src = _saved(model, tmp_path / "src")
    before = _digest(src)
    found = gp.compile_checkpoint(src, plan, tmp_path / "dst", progress=False)
    assert _digest(src) == before  # src is only read
    assert len(list((tmp_path / "dst").glob("*.safetensors"))) == 4  # a shard per layer + rest
    assert found.verified.startswith("outputs: from_pretrained(dst) equals graphprune.compile")
    reference = gp.compile(model, plan, (torch.zeros((1, 16), dtype=torch.long),))
    loaded = _loads_as(reference, tmp_path / "dst")  # bit-identical weights
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, loaded(ids).logits)
    assert found.params_after == sum(p.numel() for p in reference.parameters())
    assert found.params_after < found.params_before
    assert found.config is not None and found.config.expressible
    assert found.macs_after == gp.report(reference).macs_after


def _calibration(vocab: int = 100) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randint(0, vocab, (1, 24), generator=generator),) for _ in range(4)]


@pytest.mark.parametrize("granularity", ["channels", "heads"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_structured_wanda_streams_its_input_norms(
    tmp_path: Path, tied: bool, granularity: str
) -> None:
    """A channel plan scored by wanda from a checkpoint: the input norms come from one forward
    of the stacked calibration batches, each block loaded when reached and dropped after; the
    channels kept, and so the weights, are bit for bit those of graphprune.compile in memory,
    and the model is left on the meta device for the rewrite."""
    model = _llama(tied)
    src = _saved(model, tmp_path / "src")
    plan = gp.Plan(ratio=0.5, importance="wanda", granularity=granularity)
    batches = _calibration()
    found = gp.compile_checkpoint(src, plan, tmp_path / "dst", calibration=batches,
                                  progress=False)  # fmt: skip
    assert found.verified.startswith("outputs")
    reference = gp.compile(model, plan, (torch.zeros((1, 16), dtype=torch.long),),
                           calibration=batches)  # fmt: skip
    l2 = gp.compile(model, gp.Plan(ratio=0.5, granularity=granularity),
                    (torch.zeros((1, 16), dtype=torch.long),))  # fmt: skip
    _loads_as(reference, tmp_path / "dst")
    want = reference.state_dict()
    assert any(not torch.equal(v, l2.state_dict()[k]) for k, v in want.items())  # not l2's
    # the meta model was left as it was, tied weights one tensor: the parameters counted once
    assert found.params_after == sum(p.numel() for p in reference.parameters())
    with pytest.raises(PlanError, match="input's norm on calibration data"):
        gp.compile_checkpoint(src, plan, tmp_path / "none", progress=False)


@pytest.mark.parametrize("granularity", ["channels", "heads"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_structured_reconstruct_streams_the_refit(
    tmp_path: Path, tied: bool, granularity: str
) -> None:
    """reconstruct=True on a channel plan from a checkpoint: the original and the pruned model
    run side by side in one forward, each block read when reached (the pruned one's sliced),
    refit and written: the weights are bit for bit those of graphprune.compile in memory,
    every refit layer's error drops, and src is untouched."""
    model = _llama(tied)
    src = _saved(model, tmp_path / "src")
    before = _digest(src)
    plan = gp.Plan(ratio=0.5, granularity=granularity, reconstruct=True)
    batches = _calibration()
    found = gp.compile_checkpoint(src, plan, tmp_path / "dst", calibration=batches,
                                  progress=False)  # fmt: skip
    assert _digest(src) == before
    assert found.verified.startswith("outputs")
    reference = gp.compile(model, plan, (torch.zeros((1, 16), dtype=torch.long),),
                           calibration=batches)  # fmt: skip
    plain = gp.compile(model, gp.Plan(ratio=0.5, granularity=granularity),
                       (torch.zeros((1, 16), dtype=torch.long),))  # fmt: skip
    _loads_as(reference, tmp_path / "dst")
    want = reference.state_dict()
    refit = [k for k, v in want.items() if not torch.equal(v, plain.state_dict()[k])]
    assert refit, "the refit changed no weight"
    fitted = [f for f in found.fits if f.method == "least squares"]
    expected = [f for f in gp.report(reference).reconstruction if f.method == "least squares"]
    assert [(f.module, f.error_after) for f in fitted] == [
        (f.module, f.error_after) for f in expected
    ]
    # channels (hidden and FFN): every Linear of each layer and the head (untied: a tied
    # head is not refit); heads: o_proj of each layer
    count = 7 * 3 + (0 if tied else 1) if granularity == "channels" else 3
    assert len(fitted) == count
    assert all(f.error_after < f.error_before for f in fitted)
    # the meta model was left as it was, tied weights one tensor: the parameters counted once
    assert found.params_after == sum(p.numel() for p in reference.parameters())


def test_structured_reconstruct_resumes_after_an_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after two blocks: the rerun reads them as refit and written (not fit again) and
    ends with the bytes of an uninterrupted run."""
    src = _saved(_llama(), tmp_path / "src")
    dst, batches = tmp_path / "dst", _calibration()
    plan = gp.Plan(ratio=0.5, reconstruct=True)
    real, written = write_module.write_atomic, []

    def failing(path: Path, write: Any) -> None:
        if path.suffix == ".safetensors" and len(written) == 2:
            raise KeyboardInterrupt
        real(path, write)
        written.append(path.name)

    monkeypatch.setattr(write_module, "write_atomic", failing)
    with pytest.raises(KeyboardInterrupt):
        gp.compile_checkpoint(src, plan, dst, calibration=batches, progress=False)
    assert not dst.exists()
    monkeypatch.setattr(write_module, "write_atomic", real)
    found = gp.compile_checkpoint(src, plan, dst, calibration=batches, progress=False)
    assert found.resumed == ["model.layers.0", "model.layers.1"]
    assert not any(f.module.startswith(("model.layers.0.", "model.layers.1.")) for f in found.fits)
    assert found.verified.startswith("outputs")
    gp.compile_checkpoint(src, plan, tmp_path / "fresh", calibration=batches, progress=False)
    assert _digest(dst) == _digest(tmp_path / "fresh")


SPARSE_PLANS = [
    gp.Plan(granularity="n:m", reconstruct=True),
    gp.Plan(granularity="unstructured", ratio=0.5, reconstruct=True),
    gp.Plan(granularity="unstructured", ratio=0.5, importance="l1"),
    gp.Plan(granularity="n:m", importance="wanda"),
]


@pytest.mark.parametrize(
    "plan", SPARSE_PLANS, ids=["sparsegpt-2:4", "sparsegpt-50%", "l1-50%", "wanda-2:4"]
)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_streamed_sparse_equals_in_memory(tmp_path: Path, plan: gp.Plan, tied: bool) -> None:
    """Sparse plans from a checkpoint, one block in memory at a time (SparseGPT and wanda in
    one forward whose blocks are loaded and written by hooks): the same weights, bit for bit,
    as graphprune.compile on the loaded model, and the same per-layer report."""
    model = _llama(tied)
    src = _saved(model, tmp_path / "src")
    before = _digest(src)
    batches = _calibration()
    found = gp.compile_checkpoint(src, plan, tmp_path / "dst", calibration=batches, progress=False)
    assert _digest(src) == before
    assert found.verified.startswith("outputs: from_pretrained(dst) equals graphprune.compile")
    reference = gp.compile(model, plan, (torch.zeros((1, 16), dtype=torch.long),),
                           calibration=batches)  # fmt: skip
    expected = {s.module: s.sparsity for s in gp.report(reference).sparsity}
    gp.finalize(reference)
    _loads_as(reference, tmp_path / "dst")
    assert {s.module: s.sparsity for s in found.sparsity} == expected
    masked = [s for s in found.sparsity if s.pattern != "dense"]
    assert len(masked) == 3 * 7 + (0 if tied else 1)  # a tied head stays dense
    assert all(abs(s.sparsity - 0.5) < 1e-9 for s in masked)
    if plan.reconstruct:
        fits = [f for f in found.fits if f.method == "sparsegpt"]
        assert len(fits) == len(masked)
        assert all(f.error_after <= f.error_before for f in fits)
        assert sum(f.error_after for f in fits) < 0.9 * sum(f.error_before for f in fits)


@pytest.mark.parametrize(
    ("plan", "tied"),
    [(SPARSE_PLANS[0], False), (SPARSE_PLANS[0], True), (SPARSE_PLANS[1], False),
     (SPARSE_PLANS[3], False)],
    ids=["sparsegpt-2:4", "sparsegpt-2:4-tied", "sparsegpt-50%", "wanda-2:4"],
)  # fmt: skip
def test_offloaded_activations_give_the_in_memory_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan: gp.Plan, tied: bool
) -> None:
    """offload_dir: each calibration batch runs its own forward, all paused at every block
    (and at a masked head) with the block input in a file and its memory released; SparseGPT
    replays the block per batch up to each stage: the weights of graphprune.compile in
    memory, bit for bit, and the files are gone after. A calibration set too large to stack
    is refused without offload_dir (the error says to pass it) and runs with it."""
    import graphprune.checkpoint.offload as offload
    import graphprune.oneshot.calibration as calibration

    model = _llama(tied)
    src = _saved(model, tmp_path / "src")
    batches = _calibration()
    spilled: list[bool] = []
    real = offload._Spilled.spill

    def spill(hidden: torch.Tensor, path: Path) -> Any:
        saved = real(hidden, path)
        assert hidden.untyped_storage().nbytes() == 0  # released
        spilled.append(path.stem.rsplit("-", 1)[1] == "0")  # batch-<i>-<k>: k=0 the block input
        assert path.stat().st_size == saved.nbytes > 0
        return saved

    monkeypatch.setattr(offload._Spilled, "spill", spill)
    monkeypatch.setattr(calibration, "STACK_BYTES", 4096)  # the stacked forward cannot run
    with pytest.raises(InputError, match="offload_dir="):
        gp.compile_checkpoint(src, plan, tmp_path / "refused", calibration=batches,
                              progress=False, verify_bytes=0)  # fmt: skip
    found = gp.compile_checkpoint(src, plan, tmp_path / "dst", calibration=batches,
                                  progress=False, offload_dir=tmp_path / "acts",
                                  verify_bytes=0)  # fmt: skip
    monkeypatch.undo()
    head = plan.reconstruct and not tied  # a pause at the head SparseGPT prunes
    # every batch at every pause point (and earlier block inputs still alive: the embeddings)
    assert spilled.count(True) == len(batches) * (3 + head) < len(spilled)
    assert list((tmp_path / "acts").iterdir()) == []
    reference = gp.compile(model, plan, (torch.zeros((1, 16), dtype=torch.long),),
                           calibration=batches)  # fmt: skip
    expected = {s.module: s.sparsity for s in gp.report(reference).sparsity}
    fits = [(f.module, f.error_after) for f in gp.report(reference).reconstruction]
    gp.finalize(reference)
    _loads_as(reference, tmp_path / "dst")
    assert {s.module: s.sparsity for s in found.sparsity} == expected
    assert [(f.module, f.error_after) for f in found.fits] == fits


@contextlib.contextmanager
def _folders_left_by_other_runs(acts: Path) -> Iterator[list[Path]]:
    """Activation folders as other runs leave them in ``acts``, the first one of a dead run:
    one of a process killed outright (SIGKILL: no cleanup ran; the kernel freed its lock);
    one of this live process; one of another host on a shared disk named "<this host>-<pid>"
    (its name starts with this host's prefix and the dead process's number: only its shape
    tells it apart); the live run of another machine or container with this host name, its
    process number not running here (its lock held); and a live run's folder made and not
    yet locked -- while the ``with`` block runs."""
    from graphprune.checkpoint.scratch import LOCK, activation_folder

    script = (
        "import os, signal, sys\n"
        "from graphprune.checkpoint.scratch import activation_folder\n"
        "with activation_folder(sys.argv[1]) as folder:\n"
        "    (folder / 'batch-0-0.bin').write_bytes(b'x' * 64)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    with activation_folder(acts) as live:  # (made first: its sweep would take the dead one)
        killed = subprocess.run([sys.executable, "-c", script, str(acts)], check=False)
        assert killed.returncode == -9
        (dead,) = set(acts.iterdir()) - {live}
        prefix = f"graphprune-activations-{socket.gethostname()}-"
        pid, suffix = dead.name[len(prefix) :].split("-")  # pid: no longer running here
        other_host = acts / f"{prefix}{pid}-{pid}-{suffix}"  # host "<this host>-<pid>"
        twin = acts / f"{prefix}{pid}-twin"
        starting = acts / f"{prefix}{os.getpid()}-starting"  # made, not yet locked
        for folder in (other_host, twin, starting):
            folder.mkdir()
        with open(twin / LOCK, "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield [dead, live, other_host, twin, starting]


def test_activation_folders_on_a_file_system_without_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where flock fails (ENOLCK: a network file system without a lock service), an offloaded
    run still gets its folder, and removes no other: it cannot tell a dead run's folder from
    a live one on another machine with the same host name."""
    import errno

    import graphprune.checkpoint.scratch as scratch

    def no_locks(*_: Any) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(scratch.fcntl, "flock", no_locks)
    prefix = f"graphprune-activations-{socket.gethostname()}-"
    with scratch.activation_folder(tmp_path) as first:
        ended = [sys.executable, "-c", "import os; print(os.getpid())"]
        dead = subprocess.run(ended, capture_output=True, text=True, check=True).stdout.strip()
        left = tmp_path / f"{prefix}{dead}-left"  # a process that has ended here
        left.mkdir()
        (left / scratch.LOCK).touch()  # as a run makes it, whether it can lock it or not
        with scratch.activation_folder(tmp_path) as second:
            assert second.is_dir() and first.is_dir() and left.is_dir()
    assert sorted(tmp_path.iterdir()) == [left]


def test_a_config_its_library_refuses_is_refused_before_any_weight_is_read(
    tmp_path: Path,
) -> None:
    """A quarter of 4 heads leaves 3, and LlamaConfig refuses a hidden size (64) that is not
    a multiple of the head count (save_pretrained and from_pretrained validate it): a clear
    error before the refit's forward, no dst, src unchanged."""
    src = _saved(_llama(num_key_value_heads=4), tmp_path / "src")
    before = _digest(src)
    plan = gp.Plan(ratio=0.25, granularity="heads", reconstruct=True)
    with pytest.raises(PlanError, match=r"refused by its library .*hidden size"):
        gp.compile_checkpoint(src, plan, tmp_path / "dst", calibration=_calibration(),
                              progress=False)  # fmt: skip
    assert not (tmp_path / "dst").exists()
    assert _digest(src) == before


@pytest.mark.parametrize("offloaded", [False, True], ids=["stacked", "offloaded"])
def test_streamed_sparsegpt_follows_per_layer_attention(tmp_path: Path, offloaded: bool) -> None:
    """Gemma-3 alternates sliding-window and full attention layers (each layer gets its own
    mask in the forward): the streamed forward runs the model's own loop, so each block sees
    its own inputs -- the same weights as in memory (offloaded: each block's replay has the
    arguments that block was called with)."""
    from tests.hf_models import build

    model = build("gemma3_text", "AutoModelForCausalLM", sliding_window=4)
    src = tmp_path / "src"
    model.save_pretrained(src)
    vocab = model.config.vocab_size
    plan, batches = gp.Plan(granularity="n:m", reconstruct=True), _calibration(vocab)
    found = gp.compile_checkpoint(src, plan, tmp_path / "dst", calibration=batches,
                                  example_inputs=batches[0], progress=False,
                                  offload_dir=tmp_path / "acts" if offloaded else None)  # fmt: skip
    assert found.verified.startswith("outputs")
    reference = gp.finalize(gp.compile(model, plan, batches[0], calibration=batches))
    loaded = type(model).from_pretrained(tmp_path / "dst").eval()
    for key, value in reference.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


@pytest.mark.parametrize(
    ("plan", "offload"),
    [(gp.Plan(granularity="n:m", reconstruct=True), False),
     (gp.Plan(granularity="n:m", importance="wanda"), False),
     (gp.Plan(granularity="n:m", reconstruct=True), True)],
    ids=["sparsegpt", "wanda", "sparsegpt-offloaded"],
)  # fmt: skip
def test_streamed_sparse_resumes_after_an_interruption(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    plan: gp.Plan,
    offload: bool,
) -> None:
    """Killed after two blocks: the rerun keeps them as written (not pruned again; SparseGPT
    feeds their pruned outputs on, wanda's forward reads the source's unpruned weights) and
    ends with the bytes of an uninterrupted run; other calibration data is another run."""
    src = _saved(_llama(), tmp_path / "src")
    dst, batches = tmp_path / "dst", _calibration()
    run = {"progress": False, "offload_dir": tmp_path / "acts" if offload else None}
    real, written = write_module.write_atomic, []

    def failing(path: Path, write: Any) -> None:
        if path.suffix == ".safetensors" and len(written) == 2:
            raise KeyboardInterrupt
        real(path, write)
        written.append(path.name)

    monkeypatch.setattr(write_module, "write_atomic", failing)
    with pytest.raises(KeyboardInterrupt):
        gp.compile_checkpoint(src, plan, dst, calibration=batches, **run)
    assert not dst.exists()
    if offload:  # the paused forwards ended, their files removed
        assert list((tmp_path / "acts").iterdir()) == []
        assert not any(t.name.startswith("graphprune-calibration") for t in threading.enumerate())
    monkeypatch.setattr(write_module, "write_atomic", real)
    with pytest.raises(InputError, match="another run"):
        gp.compile_checkpoint(src, plan, dst, calibration=batches[:2], **run)
    with contextlib.ExitStack() as stack:
        others = _folders_left_by_other_runs(tmp_path / "acts")
        left = stack.enter_context(others) if offload else []
        found = gp.compile_checkpoint(src, plan, dst, calibration=batches, **run)
        if offload:  # the killed run's folder is removed; the live runs' and the other host's kept
            assert sorted((tmp_path / "acts").iterdir()) == sorted(left[1:])
            removed = [r.getMessage() for r in caplog.records if r.name.endswith(".scratch")]
            assert [m.split(":")[0] for m in removed] == [f"removed {left[0]}"]
    assert found.resumed == ["model.layers.0", "model.layers.1"]
    assert found.verified.startswith("outputs")
    gp.compile_checkpoint(src, plan, tmp_path / "fresh", calibration=batches, **run)
    assert _digest(dst) == _digest(tmp_path / "fresh")


def test_resume_after_an_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _saved(_llama(), tmp_path / "src")
    dst, plan = tmp_path / "dst", gp.Plan(ratio=0.5)
    real, written = write_module.write_atomic, []

    def failing(path: Path, write: Any) -> None:
        if path.suffix == ".safetensors" and len(written) == 2:
            raise KeyboardInterrupt  # the process is stopped mid-way
        real(path, write)
        written.append(path.name)

    monkeypatch.setattr(write_module, "write_atomic", failing)
    with pytest.raises(KeyboardInterrupt):
        gp.compile_checkpoint(src, plan, dst, progress=False)
    assert not dst.exists()  # nothing that looks complete
    partial = dst.with_name("dst.partial")
    assert sorted(p.name for p in partial.glob("*.safetensors")) == written
    monkeypatch.setattr(write_module, "write_atomic", real)
    kept = {name: (partial / name).stat().st_mtime_ns for name in written}
    with pytest.raises(InputError, match="another run"):
        gp.compile_checkpoint(src, gp.Plan(ratio=0.25), dst, progress=False)
    found = gp.compile_checkpoint(src, plan, dst, progress=False)
    assert not partial.exists() and found.verified.startswith("outputs")
    assert all((dst / name).stat().st_mtime_ns == t for name, t in kept.items())  # reused
    fresh = gp.compile_checkpoint(src, plan, tmp_path / "fresh", progress=False)
    assert fresh.params_after == found.params_after
    for name in kept:
        assert (dst / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    src = _saved(_llama(), tmp_path / "src")
    plan = gp.Plan(ratio=0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a checkpoint directory"):
        gp.compile_checkpoint(tmp_path / "empty", plan, tmp_path / "out", progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    with pytest.raises(InputError, match="exists: choose a new directory"):
        gp.compile_checkpoint(src, plan, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "file").read_text() == "mine"
    with pytest.raises(PlanError, match="weights alone"):
        gp.compile_checkpoint(src, gp.Plan(ratio=0.5, importance="taylor"), tmp_path / "o1")
    with pytest.raises(PlanError, match="not supported from a checkpoint yet"):
        gp.compile_checkpoint(src, gp.Plan(granularity="layers", ratio=0.5), tmp_path / "o")
    with pytest.raises(PlanError, match="use scope='local'"):
        sparse = gp.Plan(granularity="unstructured", ratio=0.5, scope="global")
        gp.compile_checkpoint(src, sparse, tmp_path / "o")
    with pytest.raises(PlanError, match="pass calibration="):  # never fit to placeholder ids
        gp.compile_checkpoint(src, gp.Plan(granularity="n:m", reconstruct=True), tmp_path / "o")
    with pytest.raises(PlanError, match="matches no module"):  # a typo is not skipped silently
        typo = gp.Plan(granularity="n:m", ignore=["model.layerz.*"])
        gp.compile_checkpoint(src, typo, tmp_path / "o", progress=False)
    with pytest.raises(PlanError, match="scores weights with l1, l2 or wanda"):
        sparse = gp.Plan(granularity="unstructured", ratio=0.5, importance="taylor")
        gp.compile_checkpoint(src, sparse, tmp_path / "o")
    with pytest.raises(PlanError, match="input's norm on calibration data: pass calibration="):
        sparse = gp.Plan(granularity="unstructured", ratio=0.5, importance="wanda")
        gp.compile_checkpoint(src, sparse, tmp_path / "o")
    with pytest.raises(PlanError, match="offload_dir= holds the activations"):
        gp.compile_checkpoint(src, plan, tmp_path / "o", offload_dir=tmp_path / "acts")
    with pytest.raises(InputError, match="inside the source checkpoint"):
        gp.compile_checkpoint(src, plan, src / "pruned", progress=False)
    assert not (src / "pruned").exists() and not (src / "pruned.partial").exists()
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96  # the shards no longer match the config
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"disagree with its config\.json"):
        gp.compile_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_compile_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _saved(_llama(), tmp_path / "src")
    code = cli_main(["compile-checkpoint", str(src), str(tmp_path / "dst"), "--ratio", "0.5"])
    out = capsys.readouterr().out
    assert code == 0 and "config synced" in out and "verified: outputs" in out
    assert cli_main(["compile-checkpoint", str(src), str(tmp_path / "dst")]) == 2
    assert "exists" in capsys.readouterr().err
    torch.save(torch.randint(0, 100, (4, 24)), tmp_path / "calibration.pt")
    sparse = [
        "--granularity",
        "n:m",
        "--reconstruct",
        "--calibration",
        str(tmp_path / "calibration.pt"),
    ]
    code = cli_main(["compile-checkpoint", str(src), str(tmp_path / "sparse"), *sparse])
    out = capsys.readouterr().out
    assert code == 0 and "masked layers: 22 (50.0% zeros" in out and "verified: outputs" in out
    assert "SparseGPT: 22 layers" in out


PEAK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tests.real_models import declare_torchvision_ops
    declare_torchvision_ops()
    import graphprune as gp, transformers
    import torch
    def status(key):  # KiB
        return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))
    # the imports' own transient peak must not hide the job's: reset the process's resident
    # high-water mark (Linux: clear_refs 5) and count from the resident size after them
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = status("VmRSS")
    if sys.argv[1] == "compile":
        gp.compile_checkpoint(sys.argv[2], gp.Plan(ratio=0.5), sys.argv[3], verify_bytes=0,
                              progress=False)
    ids = [(torch.randint(0, 16000, (1, 64), generator=torch.Generator().manual_seed(i)),)
           for i in range(4)]
    sparsegpt = gp.Plan(granularity="n:m", reconstruct=True, ignore=["lm_head"])
    if sys.argv[1] == "sparse":
        gp.compile_checkpoint(sys.argv[2], sparsegpt, sys.argv[3], calibration=ids,
                              verify_bytes=0, progress=False)
    if sys.argv[1].startswith("many"):  # 64 x 1024 calibration tokens
        many = [(torch.randint(0, 1000, (1, 1024), generator=torch.Generator().manual_seed(i)),)
                for i in range(64)]
        gp.compile_checkpoint(sys.argv[2], sparsegpt, sys.argv[3], calibration=many,
                              verify_bytes=0, progress=False,
                              offload_dir=sys.argv[4] if sys.argv[1] == "many-offloaded" else None)
    if sys.argv[1] == "refit":  # half the heads, each o_proj refit: two models side by side
        from graphprune.checkpoint.stream import BlockStream
        finish, between = BlockStream.finish, []
        def recorded(stream, block):  # the resident size after each decoder layer is written
            finish(stream, block)
            if stream.writer is not None and block:
                between.append(status("VmRSS") - rss)
        BlockStream.finish = recorded
        heads = gp.Plan(ratio=0.5, granularity="heads", reconstruct=True)
        tokens = torch.randint(0, 16000, (8, 256), generator=torch.Generator().manual_seed(0))
        gp.compile_checkpoint(sys.argv[2], heads, sys.argv[3], calibration=[(tokens,)],
                              verify_bytes=0, progress=False)
        print(*between)
    if sys.argv[1] == "memory-sparse":
        model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
        gp.compile(model.eval(), sparsegpt, ids[0], calibration=ids, inplace=True)
    if sys.argv[1] == "memory":  # the same job with the model loaded: graphprune.compile
        model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
        ids = torch.zeros((1, 16), dtype=torch.long)
        gp.compile(model.eval(), gp.Plan(ratio=0.5), (ids,), inplace=True)
    print(status("VmHWM") - rss)
    """
)


@pytest.mark.slow
def test_peak_memory_is_bounded_by_a_layer_not_the_model(tmp_path: Path) -> None:
    """A 123 M-parameter model (bf16, 235 MiB, 8 layers of 25 MiB): the streamed compile's
    peak above its resident size after the imports (measured in a subprocess) is a few
    layers, not the model -- a channel plan, and 2:4 SparseGPT on calibration data (plus the
    widest layer's Hessian); graphprune.compile of the loaded model (in place) needs more
    than the model."""
    model = _llama(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, vocab_size=16000,
    ).to(torch.bfloat16)  # fmt: skip
    model.save_pretrained(tmp_path / "src")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    embedding = model.model.embed_tokens.weight.numel() * 2
    del model
    peak = _peak
    streamed = peak("compile", str(tmp_path / "src"), str(tmp_path / "dst"))
    in_memory = peak("memory", str(tmp_path / "src"))
    sparse = peak("sparse", str(tmp_path / "src"), str(tmp_path / "sparse"))
    sparse_in_memory = peak("memory-sparse", str(tmp_path / "src"))
    # a fixed part (the modelling code transformers imports on first use, the analysis of
    # the meta graph: about 200 MiB here, whatever the layers' width), the largest tensor read
    # and widened to float32 for scoring (the embedding), a layer's tensors and their slices
    bound = (256 << 20) + 2 * embedding + 2 * layer
    # SparseGPT streamed: besides, the widest layer's Hessian (float64 sums, a float32 copy,
    # its inverse factor being made: about 5 float32 (columns, columns)) and the activations
    hessian = 2816 * 2816 * 4
    sparse_bound = bound + 6 * hessian
    mib = {k: round(v / 2**20) for k, v in
           {"streamed": streamed, "in memory": in_memory, "bound": bound, "weights": weights,
            "sparse": sparse, "sparse in memory": sparse_in_memory, "sparse bound": sparse_bound,
            }.items()}  # fmt: skip
    assert streamed < bound, mib
    assert in_memory > weights and in_memory - streamed > 0.75 * weights, mib
    assert sparse < sparse_bound, mib
    assert sparse_in_memory > weights and sparse_in_memory - sparse > 0.75 * weights, mib


def _peak(*args: str, allocator_as_users_run_it: bool = False) -> int:
    """The peak resident memory of the PEAK script's job (bytes, over its imports)."""
    return _measured(*args, allocator_as_users_run_it=allocator_as_users_run_it)[-1][0]


def _measured(*args: str, allocator_as_users_run_it: bool = False) -> list[list[int]]:
    """The PEAK script's job's printed lines, each a list of resident sizes (bytes)."""
    # glibc's adaptive mmap threshold keeps freed buffers in its arenas (their high-water
    # mark then depends on thread timing): a fixed threshold measures what is live; the
    # allocator as users run it measures what graphprune.memory hands back too
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    if allocator_as_users_run_it:
        env.pop("MALLOC_MMAP_THRESHOLD_")
    out = subprocess.run(
        [sys.executable, "-c", PEAK.format(root=str(ROOT)), *args], capture_output=True,
        text=True, check=True, env=env,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    numbers = [line.split() for line in lines if line.replace(" ", "").isdigit()]
    return [[int(kib) * 1024 for kib in line] for line in numbers]  # KiB


@pytest.mark.slow
def test_the_refit_peak_does_not_grow_by_a_layer_per_layer(tmp_path: Path) -> None:
    """Structured reconstruct=True from a checkpoint: the original's and the pruned model's
    decoder layers (84 MiB each here, TinyLlama's width) are read, used and dropped one
    after another beside 8 x 256 tokens of activations. With glibc's allocator as users run
    it, freed layers stayed in its arenas (a 1.1 B refit peaked at the size of its weights)
    until graphprune handed them back (graphprune.memory). 6 layers: the resident size after
    each layer is written grows by less than one layer in all (measured: 30-40 MiB; 100-200
    without the trim); against 2 layers, the peak is higher by the larger graph (the
    analysis, 12-17 MiB per layer) and the costliest of more layers, not by 4 layers more."""
    sizes = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 16000}  # fmt: skip
    runs = []
    for depth in (2, 6):
        model = _llama(**sizes, num_hidden_layers=depth).to(torch.bfloat16)
        layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        model.save_pretrained(tmp_path / f"src{depth}")
        del model
        src, dst = str(tmp_path / f"src{depth}"), str(tmp_path / f"dst{depth}")
        runs.append(_measured("refit", src, dst, allocator_as_users_run_it=True))
        shutil.rmtree(src)
        shutil.rmtree(dst)
    between, (peak,) = runs[1][-2:]
    mib = {"between layers": [b >> 20 for b in between], "peaks": [r[-1][0] >> 20 for r in runs],
           "layer": layer >> 20}  # fmt: skip
    assert len(between) == 6 and max(between[1:]) - between[0] < layer, mib
    assert peak - runs[0][-1][0] < 3 * layer, mib


@pytest.mark.slow
def test_offloaded_activations_leave_memory_to_one_batch(tmp_path: Path) -> None:
    """2:4 SparseGPT from a checkpoint on 64 x 1024 calibration tokens (a narrow model: the
    activations outweigh the weights): the stacked forward holds every batch's activations
    at once (the down projection's input alone is 128 MiB); with offload_dir each batch's
    block input waits in a file, and the peak (measured in a subprocess) is lower by more
    than that. The masks are the same, the weights up to float rounding."""
    sizes = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
             "vocab_size": 1000, "max_position_embeddings": 1024}  # fmt: skip
    _llama(**sizes).save_pretrained(tmp_path / "src")
    src = str(tmp_path / "src")
    stacked = _peak("many", src, str(tmp_path / "stacked"))
    offloaded = _peak("many-offloaded", src, str(tmp_path / "offloaded"), str(tmp_path / "acts"))
    down_proj_input = 64 * 1024 * 512 * 4  # float32
    assert offloaded + down_proj_input < stacked, (offloaded >> 20, stacked >> 20)
    assert list((tmp_path / "acts").iterdir()) == []
    one = tf.LlamaForCausalLM.from_pretrained(tmp_path / "stacked").state_dict()
    two = tf.LlamaForCausalLM.from_pretrained(tmp_path / "offloaded").state_dict()
    for key, value in one.items():
        assert torch.equal(value == 0, two[key] == 0), key  # the same masks
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-6)


def test_only_the_checkpoint_files_are_copied(tmp_path: Path) -> None:
    """Tokenizer and generation files follow the weights; weights of another format, a .git
    folder or stray files in src do not (they would describe the unpruned model)."""
    src = _saved(_llama(), tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"unpruned")
    (src / "pytorch_model.bin.index.json").write_text("{}")
    gp.compile_checkpoint(src, gp.Plan(ratio=0.5), tmp_path / "dst", progress=False)
    names = {p.name for p in (tmp_path / "dst").iterdir()}
    assert {"tokenizer.json", "generation_config.json", "config.json"} <= names
    assert not names & {"original", "pytorch_model.bin.index.json"}


def test_a_changed_source_is_not_resumed_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _saved(_llama(), tmp_path / "src")
    real = write_module.write_atomic

    def failing(path: Path, write: Any) -> None:
        if path.suffix == ".safetensors":
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(write_module, "write_atomic", failing)
    with pytest.raises(KeyboardInterrupt):
        gp.compile_checkpoint(src, gp.Plan(ratio=0.5), tmp_path / "dst", progress=False)
    monkeypatch.setattr(write_module, "write_atomic", real)
    _saved(_llama(), src)  # the source is saved again (a fine-tuned model, say)
    with pytest.raises(InputError, match="another run"):
        gp.compile_checkpoint(src, gp.Plan(ratio=0.5), tmp_path / "dst", progress=False)
