"""Checkpoints: the manifest, the fallback past a damaged checkpoint, a failed save, the rotation.

Each test saves a real ``accelerator.save_state`` of a tiny model whose weights are all 1.0 at
step 1 and all 2.0 at step 2, so the weights after a load say which checkpoint was loaded.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from kdexp import checkpoint
from kdexp.errors import UserError


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


@pytest.fixture
def model(accelerator):
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net, optimizer = accelerator.prepare(net, optimizer)
    return net


def fill(model, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def weights(model) -> set[float]:
    return {x for p in model.parameters() for x in p.detach().flatten().tolist()}


@pytest.fixture
def run(tmp_path, accelerator, model):
    """A run directory with checkpoints at steps 1 (weights 1.0) and 2 (weights 2.0); the
    model's weights are then 0.0, so that a load shows."""
    for step in (1, 2):
        fill(model, float(step))
        checkpoint.save(accelerator, tmp_path, step, keep=5)
    fill(model, 0.0)
    return tmp_path


def step_dir(run, step: int):
    return checkpoint.checkpoint_dir(run) / f"step_{step:07d}"


def truncate(path):
    path.write_bytes(path.read_bytes()[:10])


def flip_last_byte(path):
    # the tensor data ends the file: the last byte is the high byte of the last float32
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": (lambda d: truncate(d / "model.safetensors"), r"file model.safetensors has 10 bytes, expected \d+"),
    "one_byte_flipped": (lambda d: flip_last_byte(d / "model.safetensors"),
                         r"file model.safetensors has crc32 [0-9a-f]{8}, expected [0-9a-f]{8}"),
    "no_manifest": (lambda d: (d / "manifest.json").unlink(), r"no manifest.json"),
    "file_deleted": (lambda d: (d / "optimizer.bin").unlink(), r"file optimizer.bin is missing"),
}


def test_the_manifest_lists_every_file_with_its_size_and_crc32(run):
    path = step_dir(run, 2)
    manifest = json.loads((path / "manifest.json").read_text())
    files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    assert set(manifest) == set(files) - {"manifest.json"}
    assert {"model.safetensors", "optimizer.bin"} <= set(manifest)
    for name, entry in manifest.items():
        data = files[name].read_bytes()
        assert entry == {"size": len(data), "crc32": zlib.crc32(data)}
    assert checkpoint.verify(path) is None


def test_load_latest_loads_the_newest_checkpoint(run, accelerator, model, caplog):
    assert checkpoint.load_latest(accelerator, run) == step_dir(run, 2)
    assert weights(model) == {2.0}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("damage", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(run, accelerator, model, caplog, damage):
    corrupt, reason = CORRUPTIONS[damage]
    corrupt(step_dir(run, 2))
    assert checkpoint.verify(step_dir(run, 2)) is not None
    with caplog.at_level(logging.WARNING, logger="kdexp.checkpoint"):
        assert checkpoint.load_latest(accelerator, run) == step_dir(run, 1)
    assert weights(model) == {1.0}
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "step_0000002" in warning and "falling back to the previous one" in warning
    assert re.search(reason, warning), warning


def test_a_checkpoint_that_fails_to_load_is_skipped(run, accelerator, model, caplog, monkeypatch):
    """It verifies (the files are as written) but load_state raises, e.g. a state saved by an
    incompatible version."""
    real_load = accelerator.load_state

    def load_state(path, **kwargs):
        if path.endswith("step_0000002"):
            raise KeyError("state['param_groups']")
        return real_load(path, **kwargs)

    monkeypatch.setattr(accelerator, "load_state", load_state)
    with caplog.at_level(logging.WARNING, logger="kdexp.checkpoint"):
        assert checkpoint.load_latest(accelerator, run) == step_dir(run, 1)
    assert weights(model) == {1.0}
    assert "load_state failed: KeyError" in caplog.text


def test_no_usable_checkpoint_is_a_user_error_naming_the_dir_and_the_newest_fault(run, accelerator, model):
    truncate(step_dir(run, 2) / "model.safetensors")
    (step_dir(run, 1) / "manifest.json").unlink()
    with pytest.raises(UserError) as err:
        checkpoint.load_latest(accelerator, run)
    message = str(err.value)
    assert message.startswith(f"no usable checkpoint in {checkpoint.checkpoint_dir(run)} (step_0000002: ")
    assert "file model.safetensors has 10 bytes" in message and "\n" not in message
    assert weights(model) == {0.0}  # nothing was loaded


def test_no_checkpoint_at_all_is_a_user_error(tmp_path, accelerator, model):
    with pytest.raises(UserError, match=f"no checkpoint in {tmp_path}/checkpoints; start a new run"):
        checkpoint.load_latest(accelerator, tmp_path)


def full_disk_in_save_state(accelerator):
    """save_state that writes part of the checkpoint, then runs out of space."""
    def save_state(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return save_state


def safetensors_full_disk(accelerator):
    """What safetensors raises on a full disk: its own error type, the errno in the message."""
    def save_state(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    return save_state


@pytest.mark.parametrize("failure", ["save_state", "safetensors", "manifest"])
def test_a_failed_write_is_a_user_error_and_keeps_the_previous_checkpoints(run, accelerator, model,
                                                                           monkeypatch, failure):
    if failure == "save_state":
        monkeypatch.setattr(accelerator, "save_state", full_disk_in_save_state(accelerator))
    elif failure == "safetensors":
        monkeypatch.setattr(accelerator, "save_state", safetensors_full_disk(accelerator))
    else:
        def no_room(path):
            (path / "manifest.json").write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(checkpoint, "_write_manifest", no_room)
    fill(model, 3.0)
    with pytest.raises(UserError) as err:
        checkpoint.save(accelerator, run, 3, keep=1)  # rotating before step 3 is whole would lose step 1
    root = checkpoint.checkpoint_dir(run)
    assert str(err.value) == (f"could not write checkpoint step 3 in {root}: No space left on device (ENOSPC); "
                              f"the previous checkpoints are intact: free space and resume with train.resume=true")
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]  # no .tmp-*, no rotation
    assert checkpoint.verify(step_dir(run, 1)) is None and checkpoint.verify(step_dir(run, 2)) is None
    monkeypatch.undo()
    assert checkpoint.load_latest(accelerator, run) == step_dir(run, 2)
    assert weights(model) == {2.0}


def test_torch_save_failing_on_a_nearly_full_disk_is_a_full_disk(run, accelerator, monkeypatch):
    """torch.save reports a full disk as a RuntimeError without the errno: the free space tells."""
    def save_state(output_dir, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(accelerator, "save_state", save_state)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(total=10, used=10, free=0))
    with pytest.raises(UserError, match=r"No space left on device \(ENOSPC\)"):
        checkpoint.save(accelerator, run, 3, keep=2)


def test_a_bug_in_save_state_keeps_its_traceback_and_leaves_no_partial_checkpoint(run, accelerator,
                                                                                  monkeypatch):
    def save_state(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        raise ValueError("a bug, not the disk")

    monkeypatch.setattr(accelerator, "save_state", save_state)
    with pytest.raises(ValueError, match="a bug, not the disk"):
        checkpoint.save(accelerator, run, 3, keep=2)
    assert [p.name for p in checkpoint.checkpoint_dir(run).iterdir() if p.name.startswith(".tmp")] == []


def test_rotation_keeps_the_newest_k(tmp_path, accelerator, model):
    for step in range(1, 6):
        fill(model, float(step))
        checkpoint.save(accelerator, tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == ["step_0000004", "step_0000005"]
    fill(model, 0.0)
    checkpoint.load_latest(accelerator, tmp_path)
    assert weights(model) == {5.0}


@pytest.mark.parametrize("then", ["save", "load"])
def test_a_leftover_tmp_dir_is_removed(run, accelerator, then):
    leftover = checkpoint.checkpoint_dir(run) / ".tmp-step_0000007"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a checkpoint")
    if then == "save":
        checkpoint.save(accelerator, run, 3, keep=5)
    else:
        assert checkpoint.load_latest(accelerator, run) == step_dir(run, 2)
    assert not leftover.exists()
