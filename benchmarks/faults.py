"""Fault injection against the real CLI, with real faults: a real small file system that fills up (tmpfs), real
permissions (the victim runs with the capabilities that let root bypass them dropped), real signals (kill -9 at
fixed and random moments), real concurrent processes, damaged and foreign files, misused folders and flags, bounds.

Each case runs `python -m carv ...` (or a library call) and checks two things, not asserted but reported:

- **traceback**: whether any process of the case printed a Python traceback (every fault should end in one line);
- **data lost**: text-to-3d cases rerun the same command afterwards and compare the final grid (the checkpoint's
  tensors) bit for bit with an uninterrupted reference run, and the metrics' step rows with 1..steps (each once);
  refusals compare every file of the folder before and after (SHA-256); rows a resume cannot explain must be in a
  `metrics.set-aside-*` file, announced by a warning; a case whose data is lost without such a message is a
  *silent loss*.

    sudo python3 benchmarks/faults.py [--work DIR] [--markdown] [--only GROUP,...]

Run as root: the file-system cases mount a tmpfs (without root they fall back to a real per-process file-size limit,
RLIMIT_FSIZE) and the permission cases drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER with `setpriv`
(without root they are skipped and say so). Tiny settings (16^3 grid, 32 px renders, 6 steps, one thread): about
8-12 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from carv._runfolder import RunState  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "PYTHONDONTWRITEBYTECODE": "1"}
T2D = ["text-to-3d", "a snowman", "--steps", "6", "--K", "2", "--checkpoint-every", "2", "--grid-resolution", "16",
       "--render-size", "32", "--n-samples", "16", "--threads", "1"]
T2D4 = [*T2D[:3], "4", *T2D[4:]]
DISTILL = ["distill", "--steps", "6", "--eval-every", "2", "--eval-per-class", "5", "--fake-warmup", "2",
           "--fake-updates", "1", "--grid-every", "100", "--threads", "1"]
ATTR = ["--num-train", "24", "--k", "2", "--top-k", "3", "--threads", "1"]
IS_ROOT = os.geteuid() == 0
WORK = ["<unset>"]  # the scratch folder, shortened in the table
# root without the capabilities that bypass file permissions: permissions apply to it as to any user
NO_BYPASS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all"]


class Run:
    """A finished process: exit code and stderr (progress bars removed)."""

    def __init__(self, code: int, err: str):
        self.returncode, self.stderr = code, err

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def last(self) -> str:
        """The last line of stderr, with the scratch folder's path shortened to ``<work>``."""
        lines = [ln for ln in self.stderr.splitlines() if ln.strip() and "it/s" not in ln and "s/it" not in ln]
        box = [ln.strip().strip("│").strip() for ln in lines if ln.strip().startswith("│")]  # typer's usage error
        text = " ".join(box) if box else (lines[-1].strip() if lines else "")
        return text.replace(WORK[0], "<work>")

    @property
    def warnings(self) -> list[str]:
        return [ln.strip().replace(WORK[0], "<work>") for ln in self.stderr.splitlines() if ln.startswith("warning:")]


def _clean(err: str) -> str:
    return "\n".join(ln.split("\r")[-1] for ln in err.splitlines())


def carv(*args, wait=True, prefix=(), preexec=None, timeout=1800):
    cmd = [*prefix, sys.executable, "-m", "carv", *map(str, args)]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=preexec)
    if not wait:
        return p
    _, err = p.communicate(timeout=timeout)
    return Run(p.returncode, _clean(err))


def finish(p) -> Run:
    _, err = p.communicate(timeout=1800)
    return Run(p.returncode, _clean(err))


def python(code: str, *args) -> Run:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=ENV, capture_output=True, text=True,
                       timeout=600)
    return Run(r.returncode, r.stderr + r.stdout)


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".carv.lock"}


def final_grid(folder: Path):
    tensors, state = RunState(folder).load()
    return torch.cat([tensors["grid.density"].reshape(-1), tensors["grid.color"].reshape(-1)]), state["step"]


def step_rows(folder: Path) -> list[int]:
    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("kind") == "step"]


def wait_for(path: Path, proc, timeout=900.0, poll=0.005) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def kill9(p) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.communicate()


class Tmpfs:
    """A real small file system: a tmpfs of ``kb`` KiB at ``path`` (root), filled to leave ``free_kb`` free."""

    def __init__(self, path: Path, kb: int):
        self.path, self.kb = path, kb
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(path)], capture_output=True)
        self.mounted = r.returncode == 0

    def fill(self, free_kb: int) -> None:
        st = os.statvfs(self.path)
        avail = st.f_bavail * st.f_frsize
        with open(self.path / "filler.bin", "wb") as f:
            f.write(b"\0" * max(avail - free_kb * 1024, 0))

    def free(self) -> None:
        (self.path / "filler.bin").unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def fsize_limit(kb: int):
    """preexec_fn: a real per-process file-size limit (EFBIG on write), for machines where tmpfs cannot be mounted."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (kb * 1024, kb * 1024))
    return limit


class Faults:
    def __init__(self, work: Path):
        self.work = work
        self.rows: list[tuple[str, str, bool, str]] = []
        ref = work / "reference"
        r = carv(*T2D, "--out", ref)
        assert r.returncode == 0, r.stderr
        self.ref_grid, _ = final_grid(ref)

    def t2d_lost(self, folder: Path) -> str:
        """'none' if the folder's final grid equals the reference and every step row is there once."""
        try:
            grid, step = final_grid(folder)
            rows = step_rows(folder)
        except Exception as e:  # noqa: BLE001 - reported as the loss it is
            return f"cannot read the run ({type(e).__name__}: {e})"
        problems = []
        if step != 6 or not torch.equal(grid, self.ref_grid):
            problems.append(f"final grid differs from the uninterrupted run (step {step})")
        if rows != list(range(1, 7)):
            problems.append(f"metrics step rows {rows}")
        return "; ".join(problems) or "none"

    def add(self, case: str, outcome: str, runs, lost: str) -> None:
        tb = any(r.traceback for r in runs)
        self.rows.append((case, outcome, tb, lost))
        print(f"[{len(self.rows):2d}] {case}: {outcome} | traceback: {'YES' if tb else 'no'} | data lost: {lost}",
              flush=True)
        if tb:
            for r in runs:
                if r.traceback:
                    print("      " + "\n      ".join(r.stderr.strip().splitlines()[-6:]), flush=True)

    def refused(self, case: str, folder: Path, *args, runner=None) -> None:
        before = tree_hash(folder)
        r = runner() if runner else carv(*args)
        after = tree_hash(folder)
        lost = "none" if before == after else f"{len(set(before.items()) ^ set(after.items()))} files changed"
        self.add(case, f"exit {r.returncode}: {r.last[:110]}", [r], lost)

    # ------------------------------------------------------------------ signals and concurrency
    def kill9_after_checkpoint(self):
        out = self.work / "kill9"
        p = carv(*T2D, "--out", out, wait=False)
        ok = wait_for(out / "checkpoint-0000004.safetensors", p)
        kill9(p)
        r = carv(*T2D, "--out", out)
        self.add("kill -9 after the step-4 checkpoint, same command again",
                 f"{'killed at step >= 4' if ok else 'finished before the kill'}; rerun exit {r.returncode}"
                 f"{'; ' + r.warnings[0][:60] if r.warnings else ''}", [r], self.t2d_lost(out))

    def interrupted(self, sig: signal.Signals):
        out = self.work / f"signal-{sig.name}"

        def default_handlers():  # a background shell starts its children with SIGINT ignored
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        p = carv(*T2D, "--out", out, wait=False, preexec=default_handlers)
        ok = wait_for(out / "checkpoint-0000002.safetensors", p)
        p.send_signal(sig)
        r1 = finish(p)
        r2 = carv(*T2D, "--out", out)
        self.add(f"{sig.name} after the step-2 checkpoint, then the same command",
                 f"{'interrupted' if ok else 'finished first'}: exit {r1.returncode}; rerun exit {r2.returncode}",
                 [r1, r2], self.t2d_lost(out))

    def kill9_random(self, n: int = 4):
        out, rng, runs = self.work / "kill9-random", random.Random(0), []
        for _ in range(n):
            p = carv(*T2D, "--out", out, wait=False)
            wait_for(out / "metrics.jsonl", p)
            time.sleep(rng.uniform(0.0, 1.5))
            kill9(p)
        runs.append(carv(*T2D, "--out", out))
        stale = [q.name for q in out.rglob("*.tmp")]
        lost = self.t2d_lost(out)
        if stale:
            lost = (lost if lost != "none" else "") + f" stale temporaries {stale}"
        self.add(f"kill -9 at {n} random moments, then the same command", f"exit {runs[-1].returncode}; "
                 f"{len(stale)} temporary files left", runs, lost.strip())

    def paused(self, out: Path, marker: str):
        """Start the reference command in ``out`` and stop it (SIGSTOP: it keeps its locks) once ``marker`` exists, so
        that the fault and the second process happen while it is certainly alive, on a machine of any load."""
        a = carv(*T2D, "--out", out, wait=False)
        wait_for(out / marker, a, poll=0.002)
        a.send_signal(signal.SIGSTOP)
        return a

    def resume(self, a) -> Run:
        alive = a.poll() is None
        a.send_signal(signal.SIGCONT)
        r = finish(a)
        r.alive = alive
        return r

    def two_processes(self):
        out = self.work / "two"
        a = self.paused(out, "metrics.jsonl")
        b = carv(*T2D, "--out", out)
        ra = self.resume(a)
        self.add("two processes on one folder at once (the first paused mid-run while the second starts)",
                 f"second exit {b.returncode}: {b.last[:80]}; first exit {ra.returncode}", [ra, b], self.t2d_lost(out))

    def lock_deleted(self):
        out = self.work / "lock-deleted"
        a = self.paused(out, "metrics.jsonl")
        (out / ".carv.lock").unlink()
        b = carv(*T2D, "--out", out)
        ra = self.resume(a)
        self.add(".carv.lock deleted mid-run, then a second process on the folder",
                 f"second exit {b.returncode}: {b.last[:70]}; first exit {ra.returncode}", [ra, b], self.t2d_lost(out))

    def folder_replaced(self):
        out, moved = self.work / "replaced", self.work / "replaced-moved"
        a = self.paused(out, "checkpoint-0000002.safetensors")
        os.rename(out, moved)
        out.mkdir()
        ra = self.resume(a)
        stray = sorted(p.name for p in out.iterdir())
        r = carv(*T2D, "--out", moved)
        self.add("run folder moved away and replaced by an empty one mid-run, then rerun in the moved folder",
                 f"writer exit {ra.returncode}: {ra.last[:60]}; wrote into the new folder: {stray or 'nothing'}; "
                 f"rerun exit {r.returncode}", [ra, r], self.t2d_lost(moved) if not stray else f"stray {stray}")

    def fresh_parent_of_live_run(self):
        parent = self.work / "parent"
        carv(*T2D4, "--out", parent)
        live = parent / "nested"
        a = self.paused(live, "metrics.jsonl")
        h = tree_hash(parent)
        b = carv(*T2D4, "--fresh", "--out", parent)
        ra = self.resume(a)
        moved = h.keys() - tree_hash(parent).keys()
        lost = self.t2d_lost(live)
        if {k for k in moved if not k.startswith("nested/")}:
            lost = f"moved {sorted(moved)[:3]}"
        self.add("--fresh on the parent folder of another process's live run",
                 f"exit {b.returncode}: {b.last[:80]}; live run exit {ra.returncode}", [b, ra], lost)

    # ------------------------------------------------------------------ full disk, permissions
    def disk_full(self, name: str, args: list, size_kb: int, free_kb: int, check):
        base = self.work / f"tmpfs-{name}"
        fs = Tmpfs(base, size_kb) if IS_ROOT else None
        try:
            mounted = fs is not None and fs.mounted
            out = base / "run"
            if mounted:
                fs.fill(free_kb)
                r1 = carv(*args, "--out", out)
                fs.free()
                how = f"a real {fs.kb} KiB tmpfs with {free_kb} KiB free"
            else:
                r1 = carv(*args, "--out", out, preexec=fsize_limit(free_kb))
                how = f"a real {free_kb} KiB file-size limit (RLIMIT_FSIZE; tmpfs needs root)"
            r2 = carv(*args, "--out", out)
            self.add(f"{name}: the disk fills up mid-run ({how}), then freed and the same command",
                     f"exit {r1.returncode}: {r1.last[:90]}; rerun exit {r2.returncode}", [r1, r2], check(out, r2))
        finally:
            if fs is not None:
                fs.close()

    def no_bypass_case(self, case: str, body):
        if not IS_ROOT:
            self.rows.append((case, "skipped: needs root to drop the permission-bypass capabilities", False, "none"))
            print(f"[{len(self.rows):2d}] {case}: skipped (not root)", flush=True)
            return
        body(case)

    def read_only_mid_run(self, case: str):
        out = self.work / "read-only"
        p = carv(*T2D, "--out", out, wait=False, prefix=NO_BYPASS)
        ok = wait_for(out / "checkpoint-0000002.safetensors", p, poll=0.002)
        os.chmod(out, 0o555)
        r1 = finish(p)
        os.chmod(out, 0o755)
        r2 = carv(*T2D, "--out", out, prefix=NO_BYPASS)
        self.add(case, f"{'made read-only after step 2' if ok else 'finished first'}; exit {r1.returncode}: "
                       f"{r1.last[:80]}; writable again, rerun exit {r2.returncode}", [r1, r2], self.t2d_lost(out))

    def read_only_from_start(self, case: str):
        out = self.work / "read-only-start"
        out.mkdir()
        os.chmod(out, 0o555)
        r = carv(*T2D, "--out", out, prefix=NO_BYPASS)
        os.chmod(out, 0o755)
        self.add(case, f"exit {r.returncode}: {r.last[:100]}", [r], "none" if not any(out.iterdir()) else "wrote files")

    def unreadable_checkpoint(self, case: str):
        out = self.work / "unreadable"
        carv(*T2D4, "--out", out)
        os.chmod(out / "checkpoint-0000004.safetensors", 0o000)
        r = carv(*T2D, "--out", out, prefix=NO_BYPASS)
        self.add(case, f"exit {r.returncode}; {r.warnings[0][:90] if r.warnings else 'no warning'}", [r],
                 self.t2d_lost(out))

    # ------------------------------------------------------------------ damaged, missing, foreign files
    def damaged_checkpoint(self, name: str, damage):
        out = self.work / f"ckpt-{name.split()[0]}"
        carv(*T2D4, "--out", out)
        newest = out / "checkpoint-0000004.safetensors"
        newest.write_bytes(bytes(damage(bytearray(newest.read_bytes()))))
        r = carv(*T2D, "--out", out)
        self.add(f"newest checkpoint {name}, then 2 more steps",
                 f"exit {r.returncode}; {'warns: falls back to the step-2 checkpoint' if r.warnings else 'no warning'}",
                 [r], self.t2d_lost(out))

    def damaged_metrics(self, name: str, damage):
        out = self.work / f"metrics-{name.split()[0]}"
        carv(*T2D4, "--out", out)
        m = out / "metrics.jsonl"
        m.write_text(damage(m.read_text()))
        r = carv(*T2D, "--out", out)
        self.add(f"metrics.jsonl {name}, then 2 more steps",
                 f"exit {r.returncode}; {'warns: rebuilt, old file kept' if r.warnings else 'no warning'}",
                 [r], self.t2d_lost(out))

    def checkpoints_deleted(self):
        out = self.work / "no-checkpoints"
        carv(*T2D4, "--out", out)
        rows = (out / "metrics.jsonl").read_text()
        for c in out.glob("checkpoint-*"):
            c.unlink()
        r = carv(*T2D, "--out", out)
        kept = any(p.read_text() == rows for p in out.glob("metrics.set-aside-*.jsonl"))
        lost = self.t2d_lost(out) if kept else "the old metrics rows are gone"
        self.add("every checkpoint deleted, metrics.jsonl kept, then the same command",
                 f"exit {r.returncode}; {r.warnings[0][:90] if r.warnings else 'no warning'}", [r], lost)

    def checkpoint_renamed_higher(self):
        out = self.work / "renamed"
        carv(*T2D4, "--out", out)
        os.rename(out / "checkpoint-0000002.safetensors", out / "checkpoint-0000009.safetensors")
        r = carv(*T2D, "--out", out)
        self.add("step-2 checkpoint renamed to step 9, then the same command",
                 f"exit {r.returncode}; {r.warnings[0][:90] if r.warnings else 'no warning'}", [r], self.t2d_lost(out))

    def foreign_checkpoint(self, name: str, make):
        out = self.work / f"foreign-{name.split()[0]}"
        carv(*T2D4, "--out", out)
        src = make()
        shutil.copy(src, out / "checkpoint-0000005.safetensors")
        self.refused(f"a foreign checkpoint ({name}) copied in as the newest", out, *T2D, "--out", out)

    def seed1_checkpoint(self) -> Path:
        other = self.work / "seed1"
        if not other.exists():
            carv(*T2D4, "--seed", "1", "--out", other)
        return other / "checkpoint-0000004.safetensors"

    def distill_checkpoint(self) -> Path:
        d = self.work / "distill-ref"
        if not d.exists():
            carv(*DISTILL, "--out", d)
        return RunState(d).checkpoints()[0]

    def manifest_config(self, what: str, value):
        out = self.work / f"manifest-{what}"
        carv(*T2D4, "--out", out)
        m = json.loads((out / "carv-run.json").read_text())
        m["config"] = value
        (out / "carv-run.json").write_text(json.dumps(m))
        self.refused(f"carv-run.json whose config is {what}", out, *T2D, "--out", out)

    # ------------------------------------------------------------------ misused folders and flags
    def fresh_dotdot(self):
        user = self.work / "user-files"
        (user / "a").mkdir(parents=True)
        (user / "thesis.tex").write_text("years of work")
        self.refused("--fresh --out user-files/a/.. (a folder of the user's own files)", user,
                     *T2D4, "--fresh", "--out", user / "a" / "..")
        hidden = [p.name for p in (user / "a").iterdir()]
        if hidden:
            self.rows[-1] = (*self.rows[-1][:3], f"moved into {hidden}")
        run = self.work / "dotdot-run"
        carv(*T2D4, "--out", run)
        (run / "sub").mkdir()
        before = tree_hash(run)
        r = carv(*T2D4, "--fresh", "--out", run / "sub" / "..")
        old = [p for p in self.work.iterdir() if p.name.startswith("dotdot-run.old-")]
        kept = len(old) == 1 and tree_hash(old[0]) == before
        self.add("--fresh --out run/sub/.. (a run folder spelt through ..)",
                 f"exit {r.returncode}; old run moved to {old[0].name if old else '-'} (visible, beside it)", [r],
                 "none" if kept else "the old run is not intact beside the folder")

    def out_is_a_file(self):
        f = self.work / "a-file"
        f.write_text("mine")
        r = carv(*T2D4, "--out", f)
        self.add("--out <a regular file>", f"exit {r.returncode}: {r.last[:100]}", [r],
                 "none" if f.read_text() == "mine" else "the file was changed")

    def fresh_symlink(self):
        run, link = self.work / "real-run", self.work / "link-to-run"
        carv(*T2D4, "--out", run)
        link.symlink_to(run)
        before = tree_hash(run)
        r = carv(*T2D4, "--fresh", "--out", link)
        old = [p for p in self.work.iterdir() if p.name.startswith("real-run.old-")]
        kept = len(old) == 1 and tree_hash(old[0]) == before and link.is_symlink()
        self.add("--fresh --out <a symlink to a run folder>", f"exit {r.returncode}; old run moved to "
                 f"{old[0].name if old else '-'}, the link kept", [r], "none" if kept else "old run not intact")

    def attribute_two_queries(self):
        out = self.work / "attribute"
        r1 = carv("attribute", "17", *ATTR, "--out", out)
        first = {p.name: p.read_bytes() for p in out.glob("scores_*.json")}
        r2 = carv("attribute", "42", *ATTR, "--out", out)
        kept = all((out / n).read_bytes() == b for n, b in first.items()) and len(first) == 1
        n = len(list(out.glob("scores_*.json"))), len(list(out.glob("attribution_*.png")))
        self.add("carv attribute 17, then 42 into the same --out", f"exits {r1.returncode}, {r2.returncode}; "
                 f"{n[0]} score files, {n[1]} pictures", [r1, r2], "none" if kept and n == (2, 2) else
                 "the first query's outputs were overwritten")

    def attribute_degenerate(self, name: str, make):
        from PIL import Image

        path = self.work / f"query-{name.split()[0]}.png"
        make(Image).save(path)
        r = carv("attribute", path, *ATTR, "--out", self.work / "attribute")
        self.add(f"carv attribute <{name} image>", f"exit {r.returncode}; "
                 f"{r.warnings[0][:100] if r.warnings else 'no warning: a confident prediction'}", [r],
                 "none" if r.warnings else "no warning")

    def bounds(self):
        for case, args in (("text-to-3d --threads 100000", [*T2D[:-2], "--threads", "100000"]),
                           ("text-to-3d --steps 10**19", [T2D[0], T2D[1], "--steps", str(10**19), *T2D[4:]]),
                           ("text-to-3d --lr 1e308", [*T2D, "--lr", "1e308"]),
                           ("text-to-3d --lr nan", [*T2D, "--lr", "nan"]),
                           ("text-to-3d --guidance-scale 1e308", [*T2D, "--guidance-scale", "1e308"]),
                           ("distill --generator-lr 1e308", [*DISTILL, "--generator-lr", "1e308"]),
                           ("distill --threads 100000", [*DISTILL[:-2], "--threads", "100000"]),
                           ("attribute 17 --threads 100000", ["attribute", "17", *ATTR[:-2], "--threads", "100000"])):
            out = self.work / "bounds"
            out.mkdir(exist_ok=True)
            self.refused(f"carv {case}", out, *args, "--out", out)
            shutil.rmtree(out)
        lib = ("import sys, time, numpy as np, torch\nfrom carv.accounting import allocate, optimal_k\n"
               "from carv.timesteps import LearnedProposal\nt0 = time.time()\n"
               "try:\n    allocate(1, 1, 1, 1, budget=10, k_range=(1, 10**9))\nexcept ValueError as e:\n"
               "    print('allocate:', e, f'({time.time() - t0:.3f} s)')\n"
               "print('optimal_k(np.float32(1.0), ...) =', optimal_k(np.float32(1.0), np.float32(4.0), 1.0, 1.0))\n"
               "lp = LearnedProposal(1000)\ntry:\n    lp.update(torch.tensor([-1]), torch.ones(1))\n"
               "except ValueError as e:\n    print('update:', e)\nprint('untouched:', float(lp.mass.sum()) == 0)\n")
        r = python(lib)
        out = [ln for ln in r.stderr.splitlines() if ln]
        self.add("allocate(k_range=(1, 10**9)); optimal_k(np.float32); LearnedProposal.update(t=-1)",
                 "; ".join(ln[:70] for ln in out), [r],
                 "none" if r.returncode == 0 and "untouched: True" in r.stderr else "t=-1 was credited")

    def groups(self) -> dict:
        """The cases by group (``--only`` picks groups by name)."""
        def flip(d):
            g = torch.Generator().manual_seed(0)
            for i in torch.randperm(len(d) - 1000, generator=g)[:200].tolist():
                d[1000 + i] ^= 0xFF
            return d

        def distill_ok(out, r):
            rows = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
            return "none" if r.returncode == 0 and rows == [0, 2, 4, 6] else "metrics rows differ"

        ref = self.work / "reference"
        return {
            "signals": [self.kill9_after_checkpoint, self.kill9_random, lambda: self.interrupted(signal.SIGINT),
                        lambda: self.interrupted(signal.SIGTERM)],
            "concurrency": [self.two_processes, self.lock_deleted, self.folder_replaced, self.fresh_parent_of_live_run],
            "disk": [lambda: self.disk_full("text-to-3d", T2D, 2048, 300, lambda out, r: self.t2d_lost(out)),
                     lambda: self.disk_full("distill", DISTILL, 32768, 3000, distill_ok),
                     lambda: self.disk_full("attribute", ["attribute", "17", *ATTR], 2048, 40, lambda out, r: "none"
                                            if r.returncode == 0 and len(list(out.glob("scores_*.json"))) == 1
                                            else "no scores")],
            "permissions": [
                lambda: self.no_bypass_case("folder made read-only mid-run (the run without the permission-bypass "
                                            "capabilities)", self.read_only_mid_run),
                lambda: self.no_bypass_case("read-only --out folder from the start", self.read_only_from_start),
                lambda: self.no_bypass_case("newest checkpoint unreadable (mode 000)", self.unreadable_checkpoint)],
            "damaged": [lambda: self.damaged_checkpoint("truncated to half (kill mid-write)",
                                                        lambda d: d[: len(d) // 2]),
                        lambda: self.damaged_checkpoint("zero-length", lambda d: b""),
                        lambda: self.damaged_checkpoint("random bytes", lambda d: os.urandom(len(d))),
                        lambda: self.damaged_checkpoint("with 200 flipped bytes", flip),
                        lambda: self.damaged_metrics("emptied", lambda s: ""),
                        lambda: self.damaged_metrics("with a half-written middle line", lambda s: "".join(
                            ln[:9] + "\n" if i == 2 else ln for i, ln in enumerate(s.splitlines(keepends=True))))],
            "resume": [self.checkpoints_deleted, self.checkpoint_renamed_higher,
                       lambda: self.foreign_checkpoint("another seed's run", self.seed1_checkpoint),
                       lambda: self.foreign_checkpoint("a distill run's", self.distill_checkpoint)],
            "misuse": [lambda: self.refused("carv distill --out <a text-to-3d run>", ref, *DISTILL, "--out", ref),
                       lambda: self.refused("carv distill --fresh --out <a text-to-3d run>", ref, *DISTILL, "--fresh",
                                            "--out", ref),
                       lambda: self.refused("carv demo --out <a text-to-3d run>", ref, "demo", "--quick", "--out", ref),
                       lambda: self.refused("carv text-to-3d --compare --out <a plain run>", ref, *T2D, "--compare",
                                            "--out", ref),
                       lambda: self.refused("carv text-to-3d --out <same run> with another setting "
                                            "(--guidance-scale 5)", ref, *T2D, "--guidance-scale", "5", "--out", ref),
                       *(lambda w=w, v=v: self.manifest_config(w, v)
                         for w, v in (("a list", [1, 2]), ("null", None), ("a string", "x"))),
                       self.fresh_dotdot, self.fresh_symlink, self.out_is_a_file],
            "attribute": [self.attribute_two_queries,
                          lambda: self.attribute_degenerate("1x1", lambda Image: Image.new("L", (1, 1), 0)),
                          lambda: self.attribute_degenerate("fully transparent", lambda Image: Image.new(
                              "RGBA", (16, 16), (0, 0, 0, 0))),
                          lambda: self.attribute_degenerate("constant grey", lambda Image: Image.new(
                              "L", (16, 16), 128))],
            "bounds": [self.bounds],
        }

    def run(self, only: list[str] | None = None):
        for name, cases in self.groups().items():
            if not only or name in only:
                for case in cases:
                    case()
        return self.rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown at the end")
    ap.add_argument("--only", default=None, help="comma-separated groups: signals, concurrency, disk, permissions, "
                                                 "damaged, resume, misuse, attribute, bounds (default: all)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="carv-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    WORK[0] = str(work.resolve())
    t0 = time.time()
    rows = Faults(work).run(a.only.split(",") if a.only else None)
    tbs = sum(tb for _, _, tb, _ in rows)
    losses = sum(lost != "none" for *_, lost in rows)
    print(f"\n{len(rows)} cases in {time.time() - t0:.0f} s: tracebacks {tbs}, silent losses {losses} "
          f"(work folder {work})")
    if a.markdown:
        print("\n| case | outcome | traceback | data lost |\n|---|---|---|---|")
        for s, o, tb, lost in rows:
            print(f"| {s} | {o.replace('|', '/')} | {'yes' if tb else 'no'} | {lost} |")
        print(f"\n{len(rows)} cases: tracebacks {tbs}, silent losses {losses}.")
    sys.exit(0 if tbs == 0 and losses == 0 else 1)


if __name__ == "__main__":
    main()
