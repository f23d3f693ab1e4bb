"""The main job, ``carv text-to-3d``: a run folder (locked, resumable) around one :class:`Trainer`."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from carv import runner
from carv._machine import loadavg, machine_info, set_threads
from carv._progress import progress_bar
from carv._runfolder import RunFolder, RunState, atomic_write_json
from carv.accounting import accounting_sentence, calibration_sentence
from carv.apps.text_to_3d.config import (
    COMPARE_AT,
    DEFAULT_PROMPT,
    LEGACY_SETTINGS,
    RESUMABLE_CHANGES,
    TextTo3DConfig,
    config_from_cli,
    run_prompt,
)
from carv.apps.text_to_3d.outputs import quality_text, write_run_outputs
from carv.apps.text_to_3d.problem import SceneProblem, load_reference_grid
from carv.apps.text_to_3d.trainer import Trainer, problem_for, teacher_digest
from carv.teachers.scenes import load_scenes_teacher
from carv.teachers.unet import UNetTeacher

__all__ = ["open_run", "prepare_run", "run_text_to_3d", "slug", "text_to_3d_from_cli"]

# --------------------------------------------------------------------------- the main job
def prepare_run(trainer: Trainer) -> RunState:
    """Write the run's ``config.json``; the trainer's :class:`RunState` already holds the metrics (restored
    to the checkpoint's rows on resume)."""
    atomic_write_json(trainer.out / "config.json", {**asdict(trainer.cfg), "proposal_resolved":
                                                    trainer.cfg.resolved_proposal, "stratify_resolved":
                                                    trainer.cfg.resolved_stratify})
    return trainer.state


@contextmanager
def open_run(prompt: str, out_dir: str | Path | None, cfg: TextTo3DConfig | None, *, fresh: bool = False,
             progress: bool = True, teacher: UNetTeacher | None = None, compare_at: str | None = None,
             ) -> Iterator[tuple[TextTo3DConfig, Path, SceneProblem]]:
    """Open (and lock) a text-to-3D run folder; yields ``(cfg, out, problem)``.

    The folder (default ``runs/text-to-3d/<prompt>``, or ``<prompt>-compare`` for a comparison, ``compare_at``
    not None) is a :class:`carv._runfolder.RunFolder`: locked, with a manifest naming the command and
    configuration, and checksummed checkpoints; ``fresh=True`` moves an earlier run there aside first. A plain
    run's folder and a comparison's are never the same folder (the manifest names the command)."""
    cfg = dataclasses.replace(cfg) if cfg is not None else TextTo3DConfig()
    cfg.prompt = prompt
    cfg.validate()
    compare = compare_at is not None
    if compare and compare_at not in COMPARE_AT:
        raise ValueError(f"compare_at: expected one of {COMPARE_AT}, got {compare_at!r}")
    set_threads(cfg.threads)
    default_root = Path("runs/text-to-3d" if cfg.teacher is None else "runs/text-to-3d-sd")
    out = Path(out_dir) if out_dir is not None else default_root / (slug(run_prompt(prompt))
                                                                    + ("-compare" if compare else ""))
    command = "carv text-to-3d --compare" if compare else "carv text-to-3d"
    if teacher is None and cfg.teacher is None:
        teacher = load_scenes_teacher()
    digest = teacher_digest(teacher)
    identity = {**cfg.identity(), **({"compare_at": compare_at} if compare else {}),
                **({"teacher_weights": digest} if digest else {})}
    # settings the user left at their default follow the folder: None fields, and legacy settings at their default
    # (a folder that started before one existed keeps the value it ran with on every resume, not only the first)
    unset = [f.name for f in dataclasses.fields(cfg) if f.name in identity and (
        getattr(cfg, f.name) is None or (f.name in LEGACY_SETTINGS and getattr(cfg, f.name) == f.default))]
    with RunFolder(out, command, identity, RESUMABLE_CHANGES, fresh=fresh, unset=unset, legacy=LEGACY_SETTINGS,
                   ) as folder:
        if folder.previous is not None and progress:
            print(f"--fresh: moved the earlier run in {str(out)!r} to {str(folder.previous)!r}")
        if folder.adopted:
            cfg = dataclasses.replace(cfg, **{k: (None if (k, v) == ("K", "auto") else v)
                                              for k, v in folder.adopted.items()})
            if progress:
                print("resuming with the run folder's own settings: "
                      + ", ".join(f"{k} = {v!r}" for k, v in folder.adopted.items()))
        problem = problem_for(cfg, teacher)  # teacher: None only for a diffusers cfg.teacher
        if cfg.reference is not None:
            problem.set_reference(load_reference_grid(cfg.reference))
        yield cfg, out, problem


def run_text_to_3d(prompt: str = DEFAULT_PROMPT, out_dir: str | Path | None = None,
                   cfg: TextTo3DConfig | None = None, fresh: bool = False, progress: bool = True,
                   teacher: UNetTeacher | None = None, restart: bool | None = None) -> dict:
    """The main job: distil ``prompt`` into a voxel grid; write (and resume) a run folder; return a summary.

    The folder is opened by :func:`open_run` (``fresh=True`` moves an earlier run aside first; ``restart`` is its
    deprecated alias). The side-by-side comparison with the plain estimator (``carv text-to-3d --compare``) is
    :func:`carv.bench.compare.compare_text_to_3d`.
    """
    with open_run(prompt, out_dir, cfg, fresh=bool(fresh or restart), progress=progress, teacher=teacher) as opened:
        cfg, out, problem = opened
        trainer = Trainer(cfg, out, problem)
        metrics = prepare_run(trainer)
        bar = progress_bar(None, progress, total=cfg.steps, initial=trainer.step_count, desc=f"text-to-3d {cfg.method}")

        def shown(row: dict) -> None:
            if row["kind"] == "step":
                bar.update(1)
                bar.set_postfix(K=trainer.K, psnr=f"{trainer.evals[-1]['psnr']:.1f}"
                                if trainer.evals and "psnr" in trainer.evals[-1] else "-")

        try:  # an error message after an interruption starts on its own line
            runner.start(trainer, metrics)
            while not trainer.done:
                runner.advance(trainer, metrics, shown)
        finally:
            bar.close()
        final = runner.finish(trainer, metrics)
        write_run_outputs(trainer, cfg.method)
        summary = {"command": "carv text-to-3d", "prompt": problem.prompt, "method": cfg.method,
                   "steps": trainer.step_count, "train_seconds": trainer.elapsed, "final": final,
                   "K_final": trainer.K, "c_upstream_s": trainer.meter.median("upstream"),
                   "c_draw_s": trainer.meter.median("draw"), "resumed_from": trainer.resumed_from,
                   "machine": machine_info(loadavg=loadavg()), "accounting": trainer.accounting(),
                   "calibration": trainer.alloc.calibration if trainer.alloc is not None else None}
        atomic_write_json(out / "summary.json", summary)
        if progress:
            print(f"{problem.prompt!r} ({cfg.method}): {trainer.step_count} steps, {trainer.elapsed:.0f} s training, "
                  f"{quality_text(final)}, K = {trainer.K}; run folder: {out}")
            costs_line = calibration_sentence(summary["calibration"])
            if costs_line:
                print(costs_line)
            print(accounting_sentence(summary["accounting"]))
        return summary


def slug(prompt: str, max_bytes: int = 120) -> str:
    """A prompt as a folder name: its words joined by hyphens (characters other than letters, digits, ``.``,
    ``_`` and ``-`` become hyphens too). A name that would pass ``max_bytes`` (UTF-8; file systems allow 255) is
    cut to fit and ends in 8 hex digits of the prompt's SHA-256, so long prompts sharing a beginning get distinct
    folders."""
    name = re.sub(r"[^\w.-]+", "-", " ".join(prompt.split())).strip("-.") or "prompt"
    if len(name.encode()) <= max_bytes:
        return name
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cut = name.encode()[:max_bytes - 9].decode("utf-8", "ignore").rstrip("-.")
    return f"{cut}-{digest}" if cut else f"prompt-{digest}"


def text_to_3d_from_cli(prompt: str | None, out_dir: str | Path | None, flags: dict, baseline: bool = False,
                        fresh: bool = False, progress: bool = True) -> dict:
    """The ``carv text-to-3d`` command without ``--compare``: flags -> :func:`config_from_cli` ->
    :func:`run_text_to_3d`."""
    cfg = config_from_cli(prompt, flags, baseline=baseline)
    return run_text_to_3d(cfg.prompt, out_dir, cfg, fresh=fresh, progress=progress)
