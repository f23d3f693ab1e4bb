"""Peak memory of one SDS estimate on the scenes teacher at a large K (issue 11, case 6), without paying for all
of it: the teacher stops the estimate after ``--calls`` network calls. Every later block of draws is the same
size, so the peak so far is the estimate's peak (the R*K timesteps, weights and squared norms are allocated
before the first call).

    PYTHONPATH=src python3 benchmarks/memory_large_k.py --K 4096 [--calls 20]

Prints the process's peak resident memory (VmHWM) before and after, and the largest network batch.
``PYTHONPATH=<another checkout>/src`` measures another version of carv.
"""

from __future__ import annotations

import argparse
import time

import torch


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from carv import ScoreDistillation, TimestepSampler
    from carv.render.cameras import random_cameras
    from carv.teachers.base import Teacher
    from carv.teachers.scenes import load_scenes_teacher, teacher_cond

    inner = load_scenes_teacher()

    class Stop(Exception):
        pass

    class Counting(Teacher):
        def __init__(self):
            super().__init__()
            self.schedule, self.calls, self.rows = inner.schedule, 0, 0

        def predict_eps(self, x_t, t, cond=None):
            self.calls += 1
            self.rows = max(self.rows, x_t.shape[0])
            if self.calls > a.calls:
                raise Stop
            return inner.predict_eps(x_t, t, cond)

        def null_cond(self, cond):
            return inner.null_cond(cond)

    teacher = Counting()
    sds = ScoreDistillation(teacher, TimestepSampler(teacher.schedule.num_timesteps, stratify="per_upstream"), K=a.K,
                            guidance_scale=3.0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = teacher_cond(inner, "a red mushroom", random_cameras(2, torch.Generator().manual_seed(1)))
    before, t0 = peak_mib(), time.process_time()
    try:
        sds(x, cond, generator=0)
        done = "finished"
    except Stop:
        done = f"stopped after {a.calls} network calls"
    print(f"K = {a.K}, R = 2, guidance 3: {done}; peak RSS {peak_mib():.0f} MiB (before the call {before:.0f} MiB); "
          f"largest network batch {teacher.rows} rows; {time.process_time() - t0:.1f} CPU s")


if __name__ == "__main__":
    main()
