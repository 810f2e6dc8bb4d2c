"""Atomic, verified checkpoints of the whole training state; the last-K rotation; the fallback.

A checkpoint is ``accelerator.save_state`` (model, optimizer, scheduler, every RNG, and the
objects registered for checkpointing, e.g. the loop's position in the data) written to
``checkpoints/.tmp-step_N``, then ``manifest.json`` (size and CRC-32 of every file), fsynced,
then renamed to ``checkpoints/step_N``: a reader sees a whole checkpoint or none. Older ones are
rotated out only after the new one is in place, so a failed save (a full disk) leaves them as
they were.

The manifest catches what the rename cannot: a file truncated or corrupted after the fact (a
filesystem that lost writes on a crash, a bad copy). ``load_latest`` loads the newest checkpoint
that verifies and loads, warning about each one it skips. Leftover ``.tmp-*`` directories of a
process killed mid-save are removed before every save and load.

Every function that takes an ``accelerator`` is a collective call: all processes call it, the
main process alone writes, verifies and removes, and the processes agree on each outcome (one
that failed alone would leave the others waiting on it forever).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

from accelerate.utils import broadcast_object_list, gather_object

from kdexp.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_BLOCK = 16 << 20  # bytes read at a time for the CRC: checkpoint files can be tens of GB
# safetensors reports a failed write as "... I/O error: No space left on device (os error 28)"
_OS_ERROR = re.compile(r"os error (\d+)")
# torch.save reports one as "unexpected pos ..." or "file write failed", without the errno
_ALMOST_FULL = 16 << 20


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place; not necessarily intact: see ``verify``), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save(accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` ones (all if ``keep`` <= 0).

    A failure to write (full disk, no permission) removes the partial checkpoint and raises a
    ``UserError`` on every process; the previous checkpoints are untouched.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f"{_TMP_PREFIX}step_{step:07d}"
    main = accelerator.is_main_process

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)

    def publish() -> None:
        _write_manifest(tmp)
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again, e.g. after a resume
        os.replace(tmp, final)
        _fsync_dir(root)

    _together(accelerator, prepare if main else None, tmp, root, step)
    _together(accelerator, lambda: accelerator.save_state(str(tmp), safe_serialization=True), tmp, root, step)
    _together(accelerator, publish if main else None, tmp, root, step)
    if main:
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is unusable, or ``None`` if every file matches its manifest."""
    path = Path(path)
    try:
        text = (path / MANIFEST).read_text()
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except OSError as e:
        return f"{MANIFEST} is unreadable ({e.strerror})"
    try:
        expected = {name: (int(e["size"]), int(e["crc32"])) for name, e in json.loads(text).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is malformed ({type(e).__name__}: {e})"
    # sizes first: a truncated file is found without reading gigabytes
    for name, (size, _) in expected.items():
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            return f"file {name} is missing"
        except OSError as e:
            return f"file {name} is unreadable ({e.strerror})"
        if actual != size:
            return f"file {name} has {actual} bytes, expected {size}"
    for name, (_, crc) in expected.items():
        try:
            actual = _crc32(path / name)
        except OSError as e:
            return f"file {name} is unreadable ({e.strerror})"
        if actual != crc:
            return f"file {name} has crc32 {actual:08x}, expected {crc:08x}"
    return None


def load_latest(accelerator, run_dir: Path) -> Path:
    """Load the newest checkpoint of ``run_dir`` that verifies and loads; return its path.

    The main process verifies and broadcasts its choice, so every process loads the same one;
    a checkpoint that fails to load on any process is skipped by all. Raises a ``UserError``
    naming the newest checkpoint's fault when none is usable.
    """
    root = checkpoint_dir(run_dir)
    main = accelerator.is_main_process
    newest_first: list[Path] = []
    if main:
        _remove_leftovers(root)
        newest_first = list_checkpoints(run_dir)[::-1]
    first_fault: str | None = None  # "step_N: why" for the newest checkpoint, known to the main process

    def skip(name: str, why: str) -> None:
        nonlocal first_fault
        first_fault = first_fault or f"{name}: {why}"
        log.warning("checkpoint %s is unusable (%s); falling back to the previous one", root / name, why)

    while True:
        choice: list = [None, None]
        if main:
            while newest_first and (why := verify(newest_first[0])) is not None:
                skip(newest_first.pop(0).name, why)
            choice = [newest_first.pop(0).name if newest_first else None, first_fault]
        name, fault = broadcast_object_list(choice)
        if name is None:
            if fault is None:
                raise UserError(f"no checkpoint in {root}; start a new run")
            raise UserError(f"no usable checkpoint in {root} ({fault}); start a new run")
        path = root / name
        try:
            accelerator.load_state(str(path))
            error = None
        except Exception as e:  # a bad pickle, a missing key, an unloadable tensor: any fault of the files
            error = f"load_state failed: {type(e).__name__}: {_one_line(e)}"
        errors = [e for e in gather_object([error]) if e is not None]
        if not errors:
            return path
        if main:
            skip(name, errors[0])


def _together(accelerator, work: Callable[[], object] | None, tmp: Path, root: Path, step: int) -> None:
    """Run ``work`` on this process (``None``: nothing to do here); if it failed on any process,
    remove ``tmp`` and raise on every process: a write failure as a ``UserError``, anything else
    as itself where it happened."""
    failure: Exception | None = None
    if work is not None:
        try:
            work()
        except Exception as e:
            failure = e
    written = _as_write_error(failure, root) if failure is not None else None
    summary = None if failure is None else (
        ("write", written.errno, written.strerror or str(written)) if written else ("bug", _one_line(failure)))
    reports = [r for r in gather_object([summary]) if r is not None]
    if not reports:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None and written is None:
        raise failure
    writes = [r for r in reports if r[0] == "write"]
    if not writes:
        raise RuntimeError(f"saving checkpoint step {step} failed on another process: {reports[0][1]}")
    _, code, strerror = writes[0]
    name = f" ({errno.errorcode.get(code, code)})" if code is not None else ""
    raise UserError(f"could not write checkpoint step {step} in {root}: {strerror}{name}; the previous "
                    f"checkpoints are intact: free space and resume with train.resume=true") from failure


def _as_write_error(failure: Exception, root: Path) -> OSError | None:
    """``failure`` as the OSError of a failed write, or ``None`` if it is something else (a bug).

    Serializers hide the OSError of a full disk: safetensors raises its own error with the errno
    in the message, torch.save a RuntimeError without it (then a nearly full disk tells).
    """
    if isinstance(failure, OSError):
        return failure
    chain = [failure, failure.__cause__, failure.__context__]
    if match := _OS_ERROR.search(" ".join(str(e) for e in chain if e is not None)):
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    try:
        if shutil.disk_usage(root).free < _ALMOST_FULL:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        pass
    return None


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _remove_leftovers(root: Path) -> None:
    """Remove the ``.tmp-*`` directories of saves that never finished (a process killed mid-save)."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                log.info("removing %s, the remains of an unfinished save", path)
                shutil.rmtree(path, ignore_errors=True)


def _write_manifest(path: Path) -> None:
    """``path/manifest.json``: ``{relative path: {"size": bytes, "crc32": int}}`` for every file,
    written after all of them."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() != MANIFEST)
    manifest = {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "crc32": _crc32(p)} for p in files}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
