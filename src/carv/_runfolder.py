"""Run folders: one place for everything a command writes, safe against kills, full disks, lost permissions,
deleted lock files and concurrency.

Every command that writes a folder (``carv text-to-3d``, ``carv distill``, ``carv demo``, ``carv attribute``,
the benchmarks) opens it through :class:`RunFolder`, and every file carv writes goes through this module:

- **Manifest** (``carv-run.json``): the command and its configuration (with a fingerprint of the part that
  changes what is computed). A folder of another command, or a run with another configuration, is refused
  with a message naming the difference and ``--fresh``; a configuration that spells a default out explicitly
  is the same configuration (callers pass resolved values).
- **Lock**: ``fcntl.flock`` on the folder itself (an open descriptor held for the run's life) and on
  ``.carv.lock`` (which names the holder's PID). A second process is refused with one line naming that PID;
  the kernel drops the locks of a process that died (even by ``kill -9``), so a stale lock is simply taken
  over. Before every write the holder checks that the folder and the lock file on disk are still the ones it
  locked (device and inode): deleting ``.carv.lock`` or replacing the folder during a run cannot let two
  processes write one folder (the first stops with one line; its checkpoints stay resumable).
- **Fresh start**: ``fresh=True`` moves everything in the folder aside (to a visible sibling
  ``<name>.old-<time>``, the path resolved through ``..`` and symlinks first) *before* anything new is
  written, so an interrupted fresh run can never resume the old run's state, and nothing of the old run is
  lost. It moves only a run folder of the same command (a folder without carv's manifest, or another command's
  run, is refused), and never one that holds a live run's lock anywhere inside it.
- **Writes** (:func:`atomic_path` and the helpers on top of it; :func:`append_line` for JSON lines): every
  file goes to a temporary name, is flushed and fsynced, then renamed over the old one, so the last good file
  is never lost. Whatever the writer raises (``OSError``, safetensors' ``SafetensorError``, matplotlib's or
  PIL's errors) becomes one :class:`WriteError` (an ``OSError``) naming the file and the cause (``No space
  left on device``, ``Permission denied``, ...). Temporary files that a killed process left behind are removed
  when the folder is opened.
- **Checksummed checkpoints** (:class:`RunState`): one safetensors file per checkpoint holding the tensors,
  the JSON state and a copy of the metrics written so far, with a SHA-256 over all of it in its metadata.
  Checkpoints are ordered by the step they hold (numerically, at any number of digits); a damaged or
  unreadable newest checkpoint falls back to the previous good one with a warning; a checkpoint of another
  run is refused before anything is touched.
- **Metrics** (``metrics.jsonl``): on resume the file is checked against the checkpoint's copy. Nothing is
  discarded: rows written after the checkpoint, a file that lost or changed rows, or rows without any
  checkpoint are moved to ``metrics.set-aside-<time>.jsonl`` with a one-line warning, and the file is rebuilt
  from the checkpoint's copy.

Below every layer of DESIGN.md section 3 (imports nothing from carv).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import struct
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MANIFEST",
    "LOCK",
    "RunFolder",
    "RunState",
    "RunFolderError",
    "CorruptFileError",
    "RunFolderWarning",
    "WriteError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "append_line",
    "read_json",
    "update_json",
    "save_figure",
    "save_tensors",
    "load_tensors",
    "fingerprint",
    "tensors_digest",
]

MANIFEST = "carv-run.json"
LOCK = ".carv.lock"
FORMAT = "carv.run/1"
CHECKPOINT_FORMAT = "carv.checkpoint/1"
_SHA_KEY = "carv.sha256"
_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # atomic_path's temporary names: .<name>.<pid>.tmp


class RunFolderError(ValueError):
    """The folder cannot be used for this run (another command's, another configuration, in use)."""


class CorruptFileError(ValueError):
    """A file of a run folder is damaged (bad checksum, truncated, not the expected format)."""


class RunFolderWarning(UserWarning):
    """Something in a run folder was repaired (a damaged checkpoint skipped, metrics rebuilt or set aside)."""


class WriteError(OSError):
    """A file could not be written (full disk, no permission, a writer's own error); the file's previous
    version, if any, is unchanged. ``filename`` is the file, ``errno``/``strerror`` the cause where known."""

    def __str__(self) -> str:
        return f"could not write {self.filename!r}: {self.strerror}"

    @classmethod
    def of(cls, path: Path, e: BaseException) -> WriteError:
        """The one-line error for ``path`` from whatever a writer raised (safetensors reports the OS error inside
        its message: ``IoError(Os { code: 28, ... message: "No space left on device" })``)."""
        code, why = getattr(e, "errno", None), getattr(e, "strerror", None)
        if code is None:
            m = re.search(r"(?:code:|os error)\s*(\d+)", str(e))
            code = int(m.group(1)) if m else None
        if not why:
            why = os.strerror(code) if code else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        err = cls(code, why, str(path))
        err.strerror = why
        return err


# --------------------------------------------------------------------------- the locks this process holds
class _Held:
    """One folder locked by this process: its directory and lock-file descriptors and their identities."""

    def __init__(self, real: str, dir_fd: int, file_fd: int):
        self.real, self.dir_fd, self.file_fd = real, dir_fd, file_fd
        self.pending: Callable[[], None] | None = None  # a manifest update made at the first write into the folder
        self.dir_id = _ident(os.fstat(dir_fd))
        self.file_id = _ident(os.fstat(file_fd))

    def check(self) -> None:
        """Raise :class:`RunFolderError` unless the folder and its lock file on disk are the ones locked here; a
        deleted lock file is re-created and locked again (nobody else can lock the folder meanwhile)."""
        try:
            same_dir = _ident(os.stat(self.real)) == self.dir_id
        except OSError:
            same_dir = False
        if not same_dir:
            raise RunFolderError(f"run folder: {self.real!r} was removed or replaced while this run was writing to it; "
                                 f"stopped so that two runs never write one folder (rerun the command to resume "
                                 f"from its last checkpoint)")
        lock = os.path.join(self.real, LOCK)
        try:
            same_file = _ident(os.stat(lock)) == self.file_id
        except FileNotFoundError:
            same_file = self._relock(lock)
        except OSError:
            same_file = False
        if not same_file:
            raise RunFolderError(f"run folder: the lock file {lock!r} was replaced while this run held it (PID "
                                 f"{_holder(lock)} wrote the new one); stopped so that two runs never write one "
                                 f"folder")

    def _relock(self, lock: str) -> bool:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        _write_pid(fd)
        os.close(self.file_fd)
        self.file_fd, self.file_id = fd, _ident(os.fstat(fd))
        return True

    def release(self) -> None:
        for fd in (self.file_fd, self.dir_fd):
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)


_HELD: dict[str, _Held] = {}


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _holder(lock: str | Path) -> str:
    """The PID written in a lock file (``unknown`` when it cannot be read)."""
    try:
        with open(lock, "rb") as f:
            return f.read(64).decode(errors="replace").split()[0]
    except (OSError, IndexError):
        return "unknown"


def _write_pid(fd: int) -> None:
    with contextlib.suppress(OSError):  # informational only (the PID named in refusals); a full disk may refuse it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _guard(path: Path) -> None:
    """Before writing ``path``: if it lies in a folder this process has locked, check that lock is still ours."""
    target = os.path.abspath(path)
    for real, held in list(_HELD.items()):
        if target == real or target.startswith(real + os.sep) or _inside_alias(target, real):
            held.check()
            if held.pending is not None:
                update, held.pending = held.pending, None
                update()


def _inside_alias(target: str, real: str) -> bool:
    parent = os.path.dirname(target)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not parent:
        return False
    rp = os.path.realpath(parent)
    return rp == real or rp.startswith(real + os.sep)


# --------------------------------------------------------------------------- writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The one place every carv write goes through. On any failure the temporary file is removed and ``path``
    is left as it was; whatever the writer raised (an ``OSError`` for a full disk or a lost permission,
    safetensors' ``SafetensorError``, a plotting library's error) is raised as one :class:`WriteError` naming
    ``path`` itself, not the temporary name. Inside a folder this process has locked, the lock is checked
    first (:class:`RunFolderError` when another process took the folder over).
    """
    path = Path(path)
    _guard(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _guard(path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, Exception) and not isinstance(e, (RunFolderError, WriteError)):
            raise WriteError.of(path, e) from e
        raise
    _fsync_dir(path.parent)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        _write_bytes(tmp, data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line to ``path`` (flushed and fsynced). On failure the file is cut back to its previous length
    (no half-written line) and a :class:`WriteError` names it."""
    path = Path(path)
    _guard(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError.of(path, e) from e
    size = os.fstat(fd).st_size
    try:
        data = (line + "\n").encode()
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    except Exception as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise WriteError.of(path, e) from e
    finally:
        os.close(fd)


def save_figure(fig, path: str | Path, **kw) -> None:
    """``fig.savefig`` atomically (the format from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kw)


def read_json(path: str | Path, what: str = "file") -> Any:
    """``json.loads`` of a file, with errors that name the file (bad bytes, truncated or non-JSON text)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{what}: {str(path)!r} is not valid JSON ({e})") from None


def update_json(path: str | Path, entries: Mapping[str, Any] | Callable[[dict], Mapping[str, Any]],
                what: str = "JSON file") -> dict:
    """Set top-level ``entries`` in the JSON object at ``path`` and keep its other keys (a missing file starts as
    ``{}``); ``entries`` may be a function of the current object that returns them. Written atomically in
    :func:`atomic_write_json`'s format, so an interrupted write leaves the old file and the scripts that write one
    file in turn (the benchmark JSONs under ``docs/``, each its own entries) change only their own lines; there is
    no lock, so two running at once can lose one's update. Returns the object written. A file that is not JSON, or
    holds no object, raises :class:`CorruptFileError` naming it."""
    path = Path(path)
    doc = read_json(path, what) if path.is_file() else {}
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{what}: {str(path)!r} holds a JSON {type(doc).__name__}, not an object")
    doc.update(entries(doc) if callable(entries) else entries)
    atomic_write_json(path, doc)
    return doc


def _aside_name(path: Path, tag: str = "set-aside") -> Path:
    """A free visible name beside ``path`` for a file set aside: ``<stem>.<tag>-<time>[-n]<suffix>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem, suffix = path.stem.lstrip(".") or "file", path.suffix
    dest, n = path.with_name(f"{stem}.{tag}-{stamp}{suffix}"), 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{stem}.{tag}-{stamp}-{n}{suffix}")
    return dest


def _remove_stale_temporaries(folder: Path, recursive: bool) -> list[Path]:
    """Remove ``.<name>.<pid>.tmp`` files (an interrupted :func:`atomic_path`) whose process is gone."""
    removed = []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder) if folder.is_dir() else [])]
    for root, _, files in walker:
        for name in files:
            m = _TMP.match(name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, name))
                    removed.append(Path(root) / name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no write in flight while it opens a folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# --------------------------------------------------------------------------- checksummed safetensors
def tensors_digest(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 (hex) of named tensors (name, dtype, shape and bytes, in name order) and string metadata: the
    checksum checkpoints carry, and the teachers' weights digest (:func:`carv.teachers.unet.weights_digest`)."""
    metadata = metadata or {}
    h = hashlib.sha256()
    for k in sorted(metadata):
        if k != _SHA_KEY:
            h.update(json.dumps([k, metadata[k]]).encode())
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(json.dumps([k, str(v.dtype), list(v.shape)]).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors atomically, with a SHA-256 of the tensors and metadata in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta[_SHA_KEY] = tensors_digest(tensors, meta)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(path: str | Path, what: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a file written by :func:`save_tensors` and verify its checksum.

    Raises :class:`CorruptFileError` naming the file when it is empty, truncated, not safetensors or its
    checksum does not match (e.g. flipped bytes); ``FileNotFoundError`` when it is missing.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{what}: no such file", str(path))
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptFileError(f"{what}: {str(path)!r} is damaged or not a safetensors file ({e})") from None
    want = meta.get(_SHA_KEY)
    if want is None:
        raise CorruptFileError(f"{what}: {str(path)!r} has no checksum (not written by carv's run folder)")
    if tensors_digest(tensors, meta) != want:
        raise CorruptFileError(f"{what}: {str(path)!r} fails its checksum (the file is damaged)")
    return tensors, meta


def _header_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a safetensors file read from its header alone (no tensors, no checksum), or None."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if not 0 < n <= 1 << 27:
                return None
            meta = json.loads(f.read(n)).get("__metadata__")
    except (OSError, struct.error, ValueError, AttributeError):
        return None
    return meta if isinstance(meta, dict) else None


# --------------------------------------------------------------------------- metrics + checkpoints
_CKPT = re.compile(r"^checkpoint-(\d+)\.safetensors$")


class RunState:
    """Checkpoints and metrics of one run in ``path`` (no lock: the :class:`RunFolder` around it holds that).

    ``append(row)`` adds a metrics row (JSON line, flushed and fsynced); ``save(step, tensors, state)``
    writes ``checkpoint-<step>.safetensors`` (tensors + ``state`` + the metrics so far, checksummed) and keeps
    the newest ``keep``; ``load(accept)`` returns ``(tensors, state)`` of the newest good checkpoint (or None)
    and puts ``metrics.jsonl`` back to what it was at that checkpoint, setting aside what it cannot resume.
    """

    STEM = "checkpoint"

    def __init__(self, path: str | Path, metrics: str = "metrics.jsonl", keep: int = 2):
        self.path = Path(path)
        self.metrics_path = self.path / metrics
        self.keep = keep
        self._lines: list[str] = []
        self._started = False

    # ---------------------------------------------------------------- metrics
    @property
    def rows(self) -> list[dict]:
        return [json.loads(ln) for ln in self._lines]

    def start(self) -> None:
        """Begin a run from scratch: an empty metrics file. Rows already there belong to no checkpoint: they are
        moved to ``metrics.set-aside-<time>.jsonl`` with a warning, never deleted."""
        self.path.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(self.path, recursive=False)
        old = self._read_metrics()
        if old:
            dest = self._set_aside(old=None)
            warnings.warn(f"metrics: {str(self.metrics_path)!r} holds {_count_rows(old)} rows but no checkpoint to "
                          f"resume them from; moved them to {str(dest)!r} and started from step 0",
                          RunFolderWarning, stacklevel=3)
        self._lines = []
        atomic_write_text(self.metrics_path, "")
        self._started = True

    def append(self, row: dict) -> None:
        if not self._started:
            raise RuntimeError("RunState: call start() or load() before append()")
        line = json.dumps(row)
        append_line(self.metrics_path, line)
        self._lines.append(line)

    def _read_metrics(self) -> bytes | None:
        """The metrics file's bytes (None when missing; unreadable counts as present and damaged)."""
        try:
            return self.metrics_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return b"\0"

    def _set_aside(self, old: bytes | None) -> Path:
        """Move the metrics file aside (``old`` None) or write ``old`` (the rows past a checkpoint) beside it."""
        dest = _aside_name(self.metrics_path)
        if old is None:
            _guard(dest)
            try:
                os.replace(self.metrics_path, dest)
            except OSError as e:
                raise WriteError.of(dest, e) from e
        else:
            atomic_write_bytes(dest, old)
        return dest

    # ---------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, highest step in the name first (numerically: any number of digits)."""
        found = [(int(m.group(1)), p) for p in self.path.glob(f"{self.STEM}-*.safetensors")
                 if (m := _CKPT.match(p.name))]
        return [p for _, p in sorted(found, key=lambda x: (x[0], x[1].name), reverse=True)]

    def save(self, step: int, tensors: dict[str, Tensor], state: dict) -> Path:
        """Write the checkpoint of ``step``, then (once it is safely on disk) remove the older ones beyond
        ``keep``. Never removes a checkpoint of a later step than ``step``."""
        name = self.path / f"{self.STEM}-{int(step):07d}.safetensors"
        meta = {"format": CHECKPOINT_FORMAT, "step": str(int(step)), "state": json.dumps(state),
                "metrics": "".join(ln + "\n" for ln in self._lines)}
        save_tensors(name, tensors, meta)
        older = [p for p in self.checkpoints() if p != name and _step_of(p) < int(step)]
        for old in older[max(self.keep - 1, 0):]:
            with contextlib.suppress(OSError):
                old.unlink()
        return name

    def load(self, accept: Callable[[dict[str, Tensor], dict], None] | None = None
             ) -> tuple[dict[str, Tensor], dict] | None:
        """The newest checkpoint that verifies (by the step it holds), or None when there is none.

        ``accept(tensors, state)`` is the caller's check that the checkpoint is this run's (configuration, seed,
        kind): it raises to refuse one, and it runs before anything in the folder is touched. A damaged or
        unreadable checkpoint is skipped with a :class:`RunFolderWarning` (and, once a good one is found,
        renamed ``*.corrupt``: kept for inspection, never tried again); a checkpoint whose name disagrees with
        the step it holds is renamed to its step. If checkpoints exist but none verifies, raises
        :class:`CorruptFileError` naming them (every rerun does, until ``--fresh``). With no checkpoint at all,
        the run starts over (:meth:`start`: rows already in ``metrics.jsonl`` are set aside, not deleted).
        """
        if self.path.is_dir():
            _remove_stale_temporaries(self.path, recursive=False)
        bad, found = [], self._by_held_step()
        for f, _ in found:
            try:
                tensors, meta = load_tensors(f)
                if meta.get("format") != CHECKPOINT_FORMAT:
                    raise CorruptFileError(f"checkpoint: {str(f)!r} is not a carv run checkpoint")
                state, step = json.loads(meta["state"]), int(meta["step"])
                if not isinstance(state, dict) or not isinstance(meta.get("metrics"), str):
                    raise CorruptFileError(f"checkpoint: {str(f)!r} has no run state")
            except (CorruptFileError, OSError, KeyError, ValueError) as e:
                why = str(e) if isinstance(e, CorruptFileError) else f"checkpoint: {str(f)!r} cannot be read ({e})"
                bad.append((f, why))
                continue
            if accept is not None:
                accept(tensors, state)  # a foreign checkpoint is refused here, before anything is touched
            self._tidy(bad, f, step, found)
            self._restore_metrics(meta["metrics"], step)
            return tensors, state
        if bad:
            raise CorruptFileError(f"{'; '.join(m for _, m in bad)}. No good checkpoint is left in "
                                   f"{str(self.path)!r}: rerun with --fresh to move the run aside and start over")
        self.start()
        return None

    def _by_held_step(self) -> list[tuple[Path, int]]:
        """``(checkpoint, step it holds)``, newest first by the step its header says it holds (the name's step
        where the header cannot be read): a file renamed to a higher step is not taken for the newest."""
        def held(p: Path) -> int:
            meta = _header_metadata(p) or {}
            try:
                return int(meta["step"])
            except (KeyError, ValueError, TypeError):
                return _step_of(p)

        found = [(p, held(p)) for p in self.checkpoints()]
        return sorted(found, key=lambda x: (x[1], _step_of(x[0])), reverse=True)

    def _tidy(self, bad: list[tuple[Path, str]], chosen: Path, step: int, found: list[tuple[Path, int]]) -> None:
        """Rename the damaged checkpoints tried before ``chosen`` (kept, never tried again) and give every checkpoint
        whose name disagrees with the step it holds that step's name; one warning says what happened."""
        notes = []
        for b, _ in bad:
            with contextlib.suppress(OSError):
                os.replace(b, b.with_name(b.name + ".corrupt"))
        if bad:
            notes.append(f"{'; '.join(m for _, m in bad)}; resuming from the previous good checkpoint "
                         f"{str(chosen)!r} (step {step}); the damaged file is kept as *.corrupt")
        bad_files = {b for b, _ in bad}
        for f, held in found:
            if f in bad_files or _step_of(f) == held or not f.exists():
                continue
            right = f.with_name(f"{self.STEM}-{held:07d}.safetensors")
            dest = right if not right.exists() else _aside_name(f, "misnamed")
            with contextlib.suppress(OSError):
                os.replace(f, dest)
            notes.append(f"checkpoint: {str(f)!r} holds step {held}, not the step in its name; renamed it to "
                         f"{dest.name!r}")
        if notes:
            warnings.warn("; ".join(notes) + f"; resumed from step {step}", RunFolderWarning, stacklevel=4)

    def _restore_metrics(self, saved: str, step: int) -> None:
        """Make ``metrics.jsonl`` the checkpoint's copy. Rows it has beyond the copy are written to
        ``metrics.set-aside-<time>.jsonl`` (their work is redone); a file that lost or changed rows is moved
        there whole before the copy replaces it. Either way one warning names the file."""
        lines = [ln for ln in saved.splitlines() if ln]
        live, want = self._read_metrics(), saved.encode()
        if live != want:
            if live is not None and live.startswith(want):
                extra = live[len(want):]
                dest = self._set_aside(extra)
                warnings.warn(f"metrics: {_count_rows(extra)} rows of {str(self.metrics_path)!r} come after "
                              f"checkpoint step {step} (their work is redone); moved them to {str(dest)!r}",
                              RunFolderWarning, stacklevel=3)
            else:
                why = "is missing" if live is None else "lost rows or has damaged rows"
                kept = f"; the old file is kept as {str(self._set_aside(None))!r}" if live else ""
                warnings.warn(f"metrics: {str(self.metrics_path)!r} {why} against checkpoint step {step}'s copy "
                              f"({len(lines)} rows); rebuilt it from the checkpoint{kept}", RunFolderWarning,
                              stacklevel=3)
            atomic_write_text(self.metrics_path, saved)
        self._lines = lines
        self._started = True


def _step_of(p: Path) -> int:
    m = _CKPT.match(p.name)
    return int(m.group(1)) if m else -1


def _count_rows(data: bytes) -> int:
    return sum(1 for ln in data.split(b"\n") if ln.strip())


# --------------------------------------------------------------------------- the folder
def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunFolder:
    """Open ``path`` for ``command`` with ``config`` (a JSON-able dict of resolved values); a context manager.

    ``resumable`` names config keys a rerun may change (they do not change what is computed, e.g. the number
    of steps). ``fresh=True`` moves an existing run of the same command aside first. ``fresh_flag`` is how the
    user asks for that (named in refusals). After ``__enter__``: :attr:`previous` is where an old run was moved
    (or None), :attr:`real` the folder with ``..`` and symlinks resolved.
    """

    def __init__(self, path: str | Path, command: str, config: dict, resumable: Sequence[str] = (),
                 fresh: bool = False, fresh_flag: str = "--fresh", out_flag: str = "--out",
                 unset: Sequence[str] = (), legacy: dict | None = None):
        self.path = Path(path)
        self.command = command
        self.config = json.loads(json.dumps(config, default=str))
        self.resumable = tuple(resumable)
        # resuming follows the folder, not today's defaults: keys the user did not set (``unset``) take the stored
        # run's value, and keys an older carv did not write take ``legacy`` (the behaviour that run started with)
        self.unset, self.legacy = tuple(unset), dict(legacy or {})
        self.adopted: dict = {}
        self.fresh = bool(fresh)
        self.fresh_flag, self.out_flag = fresh_flag, out_flag
        self.previous: Path | None = None
        self.real: Path | None = None
        self._held: _Held | None = None

    # ---------------------------------------------------------------- lock
    def _refuse_in_use(self, lock: Path) -> RunFolderError:
        return RunFolderError(f"{self.out_flag}: {str(self.path)!r} is in use by another carv process (PID "
                              f"{_holder(lock)}); wait for it to finish or choose another {self.out_flag}")

    def _acquire(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError.of(self.path, e) from e
        real = os.path.realpath(self.path)
        self.real = Path(real)
        lock = self.real / LOCK
        if real in _HELD:
            raise self._refuse_in_use(lock)
        try:
            dfd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise WriteError.of(self.path, e) from e
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dfd)
            raise self._refuse_in_use(lock) from None
        except OSError:
            pass  # a file system without locks on directories: the lock file below is the lock
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            os.close(dfd)
            raise WriteError.of(lock, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            os.close(dfd)
            raise self._refuse_in_use(lock) from None
        _write_pid(fd)
        self._held = _HELD[real] = _Held(real, dfd, fd)

    def _release(self) -> None:
        if self._held is not None:
            _HELD.pop(self._held.real, None)
            self._held.release()
            self._held = None

    # ---------------------------------------------------------------- manifest
    def _entries(self) -> list[Path]:
        return [p for p in self.real.iterdir() if p.name != LOCK]

    def _manifest(self) -> tuple[dict | None, str | None]:
        """``(manifest, None)`` when it reads as a carv manifest, ``(None, why)`` when it is damaged, ``(None,
        None)`` when there is none."""
        mpath = self.real / MANIFEST
        if not mpath.is_file():
            return None, None
        try:
            m = read_json(mpath, "manifest")
        except (CorruptFileError, OSError) as e:
            return None, str(e) if isinstance(e, CorruptFileError) else f"manifest: {str(mpath)!r} cannot be read ({e})"
        if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("command"), str):
            return None, f"manifest: {str(mpath)!r} is not a carv run manifest"
        if not isinstance(m.get("config"), dict):
            kind = f"a {type(m['config']).__name__}" if m.get("config") is not None else "null or missing"
            return None, f"manifest: {str(mpath)!r} is damaged (its config is {kind}, not a mapping)"
        return m, None

    def _same_command(self, other: str) -> bool:
        """A run of ``other`` belongs to this command (the same command, or one with more flags of it)."""
        a, b = self.command, other
        return a == b or a.startswith(b + " ") or b.startswith(a + " ")

    def _check_movable(self) -> None:
        """Refuse ``--fresh`` on anything but a run folder of this command (or a carv run folder whose manifest
        is damaged)."""
        m, damaged = self._manifest()
        if m is None and damaged is None:
            raise RunFolderError(
                f"{self.out_flag}: {str(self.path)!r} is not empty and is not a carv run folder (no {MANIFEST}); "
                f"{self.fresh_flag} moves aside only a run folder carv wrote: choose another {self.out_flag}")
        if m is not None and not self._same_command(m["command"]):
            raise RunFolderError(
                f"{self.out_flag}: {str(self.path)!r} holds a `{m['command']}` run; {self.fresh_flag} moves aside "
                f"only a `{self.command}` run: choose another {self.out_flag}")

    def _lock_inside(self) -> list[int]:
        """Lock every folder and lock file below this one (they stay locked while it is moved); refuse when one
        is held by a live run."""
        fds: list[int] = []
        try:
            for root, dirs, files in os.walk(self.real):
                for name in [*dirs, *(f for f in files if f == LOCK)]:
                    p = os.path.join(root, name)
                    if p == str(self.real / LOCK) or os.path.islink(p):
                        continue
                    try:
                        fd = os.open(p, os.O_RDONLY)
                    except OSError:
                        continue
                    fds.append(fd)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        lock = p if name == LOCK else os.path.join(p, LOCK)
                        raise RunFolderError(
                            f"{self.out_flag}: {str(self.path)!r} holds the live run folder "
                            f"{os.path.dirname(lock)!r} (in use by PID {_holder(lock)}); {self.fresh_flag} never "
                            f"moves a run that is in progress: wait for it or choose another {self.out_flag}") from None
                    except OSError:
                        pass
        except BaseException:
            _unlock(fds)
            raise
        return fds

    def _move_aside(self) -> None:
        entries = self._entries()
        if not entries:
            return
        self._check_movable()
        fds = self._lock_inside()
        try:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = self.real.name.lstrip(".") or "run"  # never a hidden folder
            dest, n = self.real.with_name(f"{base}.old-{stamp}"), 1
            while dest.exists():
                n += 1
                dest = self.real.with_name(f"{base}.old-{stamp}-{n}")
            try:
                dest.mkdir(parents=True)
                # the manifest first: once it is gone, nothing here can be resumed as the old run
                entries.sort(key=lambda p: p.name != MANIFEST)
                for p in entries:
                    os.replace(p, dest / p.name)
            except OSError as e:
                raise WriteError.of(dest, e) from e
            _fsync_dir(self.real)
            self.previous = dest
        finally:
            _unlock(fds)

    def _check_manifest(self) -> None:
        m, damaged = self._manifest()
        if damaged is not None:
            raise RunFolderError(f"{damaged}; pass {self.fresh_flag} to move the folder's contents aside")
        if m is None:
            if self._entries():
                raise RunFolderError(
                    f"{self.out_flag}: {str(self.path)!r} is not empty and is not a carv run folder (no {MANIFEST}); "
                    f"choose another {self.out_flag} (carv never moves files it did not write)")
            return
        if m.get("command") != self.command:
            hint = (f" (or pass {self.fresh_flag} to move that run aside)" if self._same_command(m["command"]) else "")
            raise RunFolderError(
                f"{self.out_flag}: {str(self.path)!r} holds a `{m.get('command')}` run, not a `{self.command}` run; "
                f"choose another {self.out_flag}{hint}")
        old = m["config"]
        for k in self.unset:
            if k in old and old[k] != self.config.get(k):
                self.adopted[k] = self.config[k] = old[k]
        for k, v in self.legacy.items():
            if k not in old and self.config.get(k) != v:
                self.adopted[k] = self.config[k] = v
        keys = sorted((set(old) | set(self.config)) - set(self.resumable) - set(self.legacy))
        diff = [k for k in keys if old.get(k) != self.config.get(k)]
        diff += [k for k in self.legacy if k in old and old[k] != self.config.get(k)]
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}" for k in diff)
            raise RunFolderError(
                f"{self.out_flag}: {str(self.path)!r} holds a run with a different configuration ({details}); "
                f"rerun with the same settings to resume it, choose another {self.out_flag}, or pass "
                f"{self.fresh_flag} to move it aside and start over")

    def _write_manifest(self) -> None:
        """Write the manifest of a new run now; record a changed resumable setting (``--steps``) at the run's first
        write into the folder; leave an unchanged manifest alone. So a resume that is then refused (a foreign
        checkpoint) leaves every file as it was."""
        new = {"format": FORMAT, "command": self.command, "config": self.config,
               "fingerprint": fingerprint({k: v for k, v in self.config.items() if k not in self.resumable}),
               "resumable": list(self.resumable)}
        old, _ = self._manifest()
        if old is not None and all(old.get(k) == v for k, v in new.items()):
            return

        def write() -> None:
            atomic_write_json(self.real / MANIFEST, {**new, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                     "pid": os.getpid()})

        if old is None:
            write()  # a new run: the folder is marked as carv's before anything else is written
        else:  # a resumable setting changed: recorded at the run's first write, so a refused resume changes nothing
            self._held.pending = write

    def __enter__(self) -> RunFolder:
        self._acquire()
        try:
            if self.fresh:
                self._move_aside()
            self._check_manifest()
            _remove_stale_temporaries(self.real, recursive=True)
            self._write_manifest()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def state(self, sub: str | None = None, **kw) -> RunState:
        """The :class:`RunState` of this folder (or of its sub-run ``sub``)."""
        return RunState(self.path / sub if sub else self.path, **kw)


def _unlock(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)
