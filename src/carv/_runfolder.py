"""Run folders: one place for everything a command writes, safe against kills, corruption and concurrency.

Every command that writes a folder (``carv text-to-3d``, ``carv distill``, ``carv demo``, ``carv attribute``,
the benchmarks) opens it through :class:`RunFolder`:

- **Manifest** (``carv-run.json``): the command and its configuration (with a fingerprint of the part that
  changes what is computed). A folder of another command, or a run with another configuration, is refused
  with a message naming the difference and ``--fresh``; a configuration that spells a default out explicitly
  is the same configuration (callers pass resolved values).
- **Lock** (``.carv.lock``, ``fcntl.flock``): one process per folder. A second one is refused with one line
  naming the holder's PID; the kernel drops the lock of a process that died (even by ``kill -9``), so a
  stale lock is simply taken over.
- **Fresh start**: ``fresh=True`` moves everything in the folder aside (to a sibling
  ``<name>.old-<time>``) *before* anything new is written, so an interrupted fresh run can never resume
  the old run's state, and nothing of the old run is lost.
- **Atomic writes**: every file goes to a temporary name, is flushed and fsynced, then renamed over the
  old one (:func:`atomic_write_text`, :func:`atomic_path` for writers that want a path, e.g. ``savefig``).
- **Checksummed checkpoints** (:class:`RunState`): one safetensors file per checkpoint holding the tensors,
  the JSON state and a copy of the metrics written so far, with a SHA-256 over all of it in its metadata.
  Loading verifies it; a damaged newest checkpoint falls back to the previous good one with a warning;
  when none is good the error names the files.
- **Metrics** (``metrics.jsonl``): on resume the file is checked against the checkpoint's copy; rows
  written after the checkpoint are dropped (that work is redone), and a file that lost or changed rows
  (emptied, truncated, a damaged line) is rebuilt from the copy with a warning, never silently.

Below every layer of DESIGN.md section 3 (imports nothing from carv).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
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
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "read_json",
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


class RunFolderError(ValueError):
    """The folder cannot be used for this run (another command's, another configuration, in use)."""


class CorruptFileError(ValueError):
    """A file of a run folder is damaged (bad checksum, truncated, not the expected format)."""


class RunFolderWarning(UserWarning):
    """Something in a run folder was repaired (a damaged checkpoint skipped, metrics rebuilt)."""


# --------------------------------------------------------------------------- atomic writes
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

    On an exception the temporary file is removed and ``path`` is left as it was; an ``OSError`` (a full disk, no
    permission) is raised again naming ``path`` itself, not the temporary name, so the one-line error says which
    file could not be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None and e.filename != str(path):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
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


# --------------------------------------------------------------------------- metrics + checkpoints
class RunState:
    """Checkpoints and metrics of one run in ``path`` (no lock: the :class:`RunFolder` around it holds that).

    ``append(row)`` adds a metrics row (JSON line, flushed and fsynced); ``save(step, tensors, state)``
    writes ``checkpoint-<step>.safetensors`` (tensors + ``state`` + the metrics so far, checksummed) and keeps
    the newest ``keep``; ``load()`` returns ``(tensors, state)`` of the newest good checkpoint (or None)
    and puts ``metrics.jsonl`` back to what it was at that checkpoint.
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
        """Begin a run from scratch: an empty metrics file (old rows belong to no checkpoint)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lines = []
        atomic_write_text(self.metrics_path, "")
        self._started = True

    def append(self, row: dict) -> None:
        if not self._started:
            raise RuntimeError("RunState: call start() or load() before append()")
        line = json.dumps(row)
        with open(self.metrics_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._lines.append(line)

    # ---------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, newest (highest step) first."""
        return sorted(self.path.glob(f"{self.STEM}-*.safetensors"), reverse=True)

    def save(self, step: int, tensors: dict[str, Tensor], state: dict) -> Path:
        name = self.path / f"{self.STEM}-{int(step):07d}.safetensors"
        meta = {"format": CHECKPOINT_FORMAT, "step": str(int(step)), "state": json.dumps(state),
                "metrics": "".join(ln + "\n" for ln in self._lines)}
        save_tensors(name, tensors, meta)
        for old in self.checkpoints()[self.keep:]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return name

    def load(self) -> tuple[dict[str, Tensor], dict] | None:
        """The newest checkpoint that verifies, or None when there is none (then a fresh metrics file).

        A damaged checkpoint is skipped with a :class:`RunFolderWarning` (and, once a good one is found,
        renamed ``*.corrupt``: kept for inspection, never tried again); if checkpoints exist but none
        verifies, raises :class:`CorruptFileError` naming them (every rerun does, until ``--fresh``).
        """
        files = self.checkpoints()
        bad = []
        for f in files:
            try:
                tensors, meta = load_tensors(f)
                if meta.get("format") != CHECKPOINT_FORMAT:
                    raise CorruptFileError(f"checkpoint: {str(f)!r} is not a carv run checkpoint")
                state = json.loads(meta["state"])
            except CorruptFileError as e:
                bad.append((f, str(e)))
                continue
            for b, _ in bad:  # kept for inspection, never tried (or pruned into) again
                with contextlib.suppress(OSError):
                    os.replace(b, b.with_name(b.name + ".corrupt"))
            if bad:
                warnings.warn(f"{'; '.join(m for _, m in bad)}; resuming from the previous good checkpoint {str(f)!r} "
                              f"(step {meta['step']})", RunFolderWarning, stacklevel=2)
            self._restore_metrics(meta["metrics"], int(meta["step"]))
            return tensors, state
        if bad:
            raise CorruptFileError(f"{'; '.join(m for _, m in bad)}. No good checkpoint is left in "
                                   f"{str(self.path)!r}: rerun with --fresh to move the run aside and start over")
        self.start()
        return None

    def _restore_metrics(self, saved: str, step: int) -> None:
        lines = [ln for ln in saved.splitlines() if ln]
        try:
            live = self.metrics_path.read_bytes().decode("utf-8") if self.metrics_path.is_file() else None
        except UnicodeDecodeError:
            live = "\0"
        if live is None or not live.startswith(saved):
            why = ("is missing" if live is None else
                   "lost rows or has damaged rows")
            warnings.warn(f"metrics: {str(self.metrics_path)!r} {why} against checkpoint step {step}'s copy "
                          f"({len(lines)} rows); rebuilt it from the checkpoint", RunFolderWarning, stacklevel=3)
        atomic_write_text(self.metrics_path, saved)  # rows after the checkpoint are redone
        self._lines = lines
        self._started = True


# --------------------------------------------------------------------------- the folder
def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunFolder:
    """Open ``path`` for ``command`` with ``config`` (a JSON-able dict of resolved values); a context manager.

    ``resumable`` names config keys a rerun may change (they do not change what is computed, e.g. the number
    of steps). ``fresh=True`` moves an existing run aside first. ``fresh_flag`` is how the user asks for
    that (named in refusals). After ``__enter__``: :attr:`previous` is where an old run was moved (or None).
    """

    def __init__(self, path: str | Path, command: str, config: dict, resumable: Sequence[str] = (),
                 fresh: bool = False, fresh_flag: str = "--fresh", out_flag: str = "--out"):
        self.path = Path(path)
        self.command = command
        self.config = json.loads(json.dumps(config, default=str))
        self.resumable = tuple(resumable)
        self.fresh = bool(fresh)
        self.fresh_flag, self.out_flag = fresh_flag, out_flag
        self.previous: Path | None = None
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- lock
    def _acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").split()[0]
            except (OSError, IndexError):
                holder = "unknown"
            os.close(fd)
            raise RunFolderError(f"{self.out_flag}: {str(self.path)!r} is in use by another carv process "
                                 f"(PID {holder}); wait for it to finish or choose another {self.out_flag}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.command}\n".encode())
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- manifest
    def _entries(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name != LOCK]

    def _move_aside(self) -> None:
        entries = self._entries()
        if not entries:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path.with_name(f"{self.path.name}.old-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}")
        dest.mkdir(parents=True)
        # the manifest first: once it is gone, nothing here can be resumed as the old run
        entries.sort(key=lambda p: p.name != MANIFEST)
        for p in entries:
            os.replace(p, dest / p.name)
        _fsync_dir(self.path)
        self.previous = dest

    def _check_manifest(self) -> None:
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            if self._entries():
                raise RunFolderError(
                    f"{self.out_flag}: {str(self.path)!r} is not empty and is not a carv run folder (no {MANIFEST}); "
                    f"choose another {self.out_flag}, or pass {self.fresh_flag} to move its contents aside")
            return
        try:
            m = read_json(mpath, "manifest")
        except CorruptFileError as e:
            raise RunFolderError(f"{e}; pass {self.fresh_flag} to move the folder's contents aside") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise RunFolderError(f"manifest: {str(mpath)!r} is not a carv run manifest; pass {self.fresh_flag} "
                                 f"to move the folder's contents aside")
        if m.get("command") != self.command:
            raise RunFolderError(
                f"{self.out_flag}: {str(self.path)!r} holds a `{m.get('command')}` run, not a `{self.command}` run; "
                f"choose another {self.out_flag} (or pass {self.fresh_flag} to move that run aside)")
        old = m.get("config", {})
        keys = sorted((set(old) | set(self.config)) - set(self.resumable))
        diff = [k for k in keys if old.get(k) != self.config.get(k)]
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}" for k in diff)
            raise RunFolderError(
                f"{self.out_flag}: {str(self.path)!r} holds a run with a different configuration ({details}); "
                f"rerun with the same settings to resume it, choose another {self.out_flag}, or pass "
                f"{self.fresh_flag} to move it aside and start over")

    def _write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, {
            "format": FORMAT, "command": self.command, "config": self.config,
            "fingerprint": fingerprint({k: v for k, v in self.config.items() if k not in self.resumable}),
            "resumable": list(self.resumable), "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            "pid": os.getpid()})

    def __enter__(self) -> RunFolder:
        self._acquire()
        try:
            if self.fresh:
                self._move_aside()
            self._check_manifest()
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
