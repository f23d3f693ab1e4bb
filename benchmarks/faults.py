"""Fault injection against the real CLI: kill -9, truncated / zeroed / bit-flipped checkpoints, damaged metrics,
two processes on one folder, another command's folder, --compare on a plain run, --fresh after an interrupted
fresh run, a full disk. Prints a table (scenario, outcome, data lost); "data lost" is checked, not asserted:

- text-to-3d scenarios rerun the same command afterwards and compare the final grid (the checkpoint's tensors)
  bit for bit with an uninterrupted reference run, and the metrics' step rows with 1..steps (each once);
- refusals compare every file of the folder they were pointed at before and after (SHA-256);
- --fresh checks that the old run is intact beside the folder and that the fresh run continues.

    python3 benchmarks/faults.py [--work DIR] [--markdown]

Tiny settings (16^3 grid, 32 px renders, 6 steps, one thread): about 3-6 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
T2D = ["text-to-3d", "a snowman", "--steps", "6", "--K", "2", "--checkpoint-every", "2", "--grid-resolution", "16",
       "--render-size", "32", "--n-samples", "16", "--threads", "1"]
DISTILL = ["distill", "--steps", "6", "--eval-every", "2", "--eval-per-class", "5", "--fake-warmup", "2",
           "--fake-updates", "1", "--grid-every", "100", "--threads", "1"]


def carv(*args, wait=True, **kw):
    cmd = [sys.executable, "-m", "carv", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800, **kw)


def last_line(res) -> str:
    lines = [ln for ln in (res.stderr or "").splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    return lines[-1].strip() if lines else ""


def warnings_of(res) -> list[str]:
    return [ln.strip() for ln in (res.stderr or "").splitlines() if ln.startswith("warning:")]


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".carv.lock"}


def final_grid(folder: Path) -> torch.Tensor:
    tensors, state = RunState(folder).load()
    return torch.cat([tensors["grid.density"].reshape(-1), tensors["grid.color"].reshape(-1)]), state["step"]


def step_rows(folder: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (folder / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln).get("kind") == "step"]


def wait_for(path: Path, proc, timeout=900.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


class Faults:
    def __init__(self, work: Path):
        self.work = work
        self.rows: list[tuple[str, str, str]] = []
        ref = work / "reference"
        r = carv(*T2D, "--out", ref)
        assert r.returncode == 0, r.stderr
        self.ref_grid, _ = final_grid(ref)

    def t2d_lost(self, folder: Path) -> str:
        """'none' if the folder's final grid equals the reference and every step row is there once."""
        grid, step = final_grid(folder)
        rows = step_rows(folder)
        problems = []
        if step != 6 or not torch.equal(grid, self.ref_grid):
            problems.append(f"final grid differs from the uninterrupted run (step {step})")
        if rows != list(range(1, 7)):
            problems.append(f"metrics step rows {rows}")
        return "; ".join(problems) or "none"

    def add(self, scenario: str, outcome: str, lost: str) -> None:
        self.rows.append((scenario, outcome, lost))
        print(f"[{len(self.rows):2d}] {scenario}: {outcome} | data lost: {lost}", flush=True)

    # ------------------------------------------------------------------ scenarios
    def kill9(self):
        out = self.work / "kill9"
        p = carv(*T2D, "--out", out, wait=False)
        ok = wait_for(out / "checkpoint-0000004.safetensors", p)
        p.send_signal(signal.SIGKILL)
        p.wait()
        r = carv(*T2D, "--out", out)
        resumed = json.loads((out / "summary.json").read_text())["resumed_from"]
        self.add("kill -9 after the step-4 checkpoint, same command again",
                 f"{'killed at step >= 4' if ok else 'finished before the kill'}; rerun exit {r.returncode}, "
                 f"resumed from step {resumed}", self.t2d_lost(out))

    def damaged_checkpoint(self, name: str, damage):
        out = self.work / f"ckpt-{name}"
        r = carv(*T2D[:3], "4", *T2D[4:], "--out", out)
        newest = out / "checkpoint-0000004.safetensors"
        data = bytearray(newest.read_bytes())
        newest.write_bytes(bytes(damage(data)))
        r = carv(*T2D, "--out", out)
        w = warnings_of(r)
        self.add(f"newest checkpoint {name}, then 2 more steps",
                 f"exit {r.returncode}; {'one warning: falls back to the step-2 checkpoint' if w else 'no warning'}",
                 self.t2d_lost(out))

    def damaged_metrics(self, name: str, damage):
        out = self.work / f"metrics-{name}"
        carv(*T2D[:3], "4", *T2D[4:], "--out", out)
        m = out / "metrics.jsonl"
        m.write_text(damage(m.read_text()))
        r = carv(*T2D, "--out", out)
        w = warnings_of(r)
        self.add(f"metrics.jsonl {name}, then 2 more steps",
                 f"exit {r.returncode}; {'one warning: rebuilt from the checkpoint' if w else 'no warning'}",
                 self.t2d_lost(out))

    def two_processes(self):
        out = self.work / "two"
        a = carv(*T2D, "--out", out, wait=False)
        wait_for(out / ".carv.lock", a)
        time.sleep(0.5)
        b = carv(*T2D, "--out", out)
        a.wait()
        self.add("two processes on one folder at once",
                 f"first exit {a.returncode}; second exit {b.returncode}: {last_line(b)[:90]}", self.t2d_lost(out))

    def refused(self, scenario: str, folder: Path, *args):
        before = tree_hash(folder)
        r = carv(*args)
        after = tree_hash(folder)
        lost = "none" if before == after else f"{len(set(before.items()) ^ set(after.items()))} files changed"
        self.add(scenario, f"exit {r.returncode}: {last_line(r)[:100]}", lost)

    def manifest_truncated(self):
        out = self.work / "manifest"
        carv(*T2D[:3], "4", *T2D[4:], "--out", out)
        m = out / "carv-run.json"
        m.write_text(m.read_text()[:40])
        before = tree_hash(out)
        r = carv(*T2D, "--out", out)
        self.add("manifest (carv-run.json) truncated", f"exit {r.returncode}: {last_line(r)[:100]}",
                 "none" if tree_hash(out) == before else "files changed")

    def fresh_after_interrupted_fresh(self):
        out = self.work / "D"
        r = carv(*DISTILL, "--R", "3", "--out", out)
        assert r.returncode == 0, r.stderr
        old_final = hashlib.sha256((out / "final.safetensors").read_bytes()).hexdigest()
        p = carv(*DISTILL, "--R", "2", "--fresh", "--out", out, wait=False)
        wait_for(out / "checkpoint-0000002.safetensors", p)
        p.send_signal(signal.SIGKILL)
        p.wait()
        old_flags = carv(*DISTILL, "--R", "3", "--out", out)
        again = carv(*DISTILL, "--R", "2", "--out", out)
        old = [q for q in self.work.iterdir() if q.name.startswith("D.old-")]
        kept = len(old) == 1 and hashlib.sha256((old[0] / "final.safetensors").read_bytes()).hexdigest() == old_final
        steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
        cfg = json.loads((out / "config.json").read_text())
        lost = "none" if kept and steps == [0, 2, 4, 6] and cfg["R"] == 2 else \
            f"old run kept: {kept}; steps {steps}; R {cfg['R']}"
        self.add("distill --fresh (R 2) over a finished run (R 3), killed -9, then rerun",
                 f"old flags refused (exit {old_flags.returncode}, names --fresh: {'--fresh' in old_flags.stderr}); "
                 f"fresh flags resume the fresh run (exit {again.returncode}); old run kept in "
                 f"{old[0].name if old else '-'}",
                 lost)

    def disk_full(self):
        out = self.work / "enospc"
        shim = ("import errno, sys\nfrom carv import _runfolder as rf\nn = [0]\norig = rf.save_tensors\n"
                "def full(path, *a, **k):\n    n[0] += 1\n    if n[0] == 2:\n"
                "        raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
                "    return orig(path, *a, **k)\nrf.save_tensors = full\n"
                "sys.argv = ['carv'] + sys.argv[1:]\nfrom carv.cli import main\nmain()\n")
        r = subprocess.run([sys.executable, "-c", shim, *T2D, "--out", str(out)], env=ENV, capture_output=True,
                           text=True, timeout=1800)
        tb = "Traceback" in r.stderr
        r2 = carv(*T2D, "--out", out)
        self.add("disk full (ENOSPC) at the second checkpoint write, then the same command",
                 f"exit {r.returncode}, {'a traceback' if tb else 'one line'}: {last_line(r)[:70]}...; rerun exit "
                 f"{r2.returncode}", self.t2d_lost(out))

    def run(self):
        self.kill9()
        self.damaged_checkpoint("truncated to half (kill mid-write)", lambda d: d[: len(d) // 2])
        self.damaged_checkpoint("zero-length", lambda d: b"")
        self.damaged_checkpoint("random bytes", lambda d: os.urandom(len(d)))

        def flip(d):
            g = torch.Generator().manual_seed(0)
            for i in torch.randperm(len(d) - 1000, generator=g)[:200].tolist():
                d[1000 + i] ^= 0xFF
            return d

        self.damaged_checkpoint("with 200 flipped bytes", flip)
        self.damaged_metrics("emptied", lambda s: "")
        self.damaged_metrics("with a half-written middle line",
                             lambda s: "".join(ln[:9] + "\n" if i == 2 else ln for i, ln in
                                               enumerate(s.splitlines(keepends=True))))
        self.two_processes()
        ref = self.work / "reference"
        self.refused("carv distill --out <a text-to-3d run>", ref, *DISTILL, "--out", ref)
        self.refused("carv demo --out <a text-to-3d run>", ref, "demo", "--quick", "--out", ref)
        self.refused("carv text-to-3d --compare --out <a plain run>", ref, *T2D, "--compare", "--out", ref)
        self.refused("carv text-to-3d --out <same run> with another setting (--guidance-scale 5)", ref,
                     *T2D, "--guidance-scale", "5", "--out", ref)
        self.manifest_truncated()
        self.fresh_after_interrupted_fresh()
        self.disk_full()
        return self.rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown at the end")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="carv-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = Faults(work).run()
    print(f"\n{len(rows)} scenarios in {time.time() - t0:.0f} s (work folder {work})")
    if a.markdown:
        print("\n| scenario | outcome | data lost |\n|---|---|---|")
        for s, o, lost in rows:
            print(f"| {s} | {o.replace('|', '/')} | {lost} |")
    sys.exit(0 if all(lost == "none" for *_, lost in rows) else 1)


if __name__ == "__main__":
    main()
