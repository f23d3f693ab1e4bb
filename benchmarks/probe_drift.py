"""How fast a distillation run's variance components move, against the probes the allocator reads: the regime sweep's
distillation run (``regime_sweep.distill_snapshot``, the same seed and steps), printing each probe the run makes
and, every ``--every`` steps, the mean of ``--probes`` extra probes' between and within parts at that step's state
(taken on a copy of the run, which continues untouched). The allocator keeps the last 9 probes; where the frozen
means move by more than the probes' own scatter between two of them, the run chooses ``(R, K)`` for a state it has
left.

    PYTHONPATH=src python benchmarks/probe_drift.py --seed 0 --steps 100
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
from pathlib import Path

import torch
from regime_sweep import distill_snapshot


def frozen_probes(d, acc, n: int) -> list[tuple[float, float]]:
    """``n`` probe steps (the Accountant's own path, iid draws) on a copy of the run at the state its next
    generator gradient is taken at (the fake score caught up); no optimiser step, so the state stays put."""
    d, acc = copy.deepcopy((d, acc))
    d.fake_catch_up()  # the next step's fake-score updates: the state its generator gradient (and probe) sees
    out = []
    for _ in range(n):
        acc.allocator.next_probe = 0  # due now
        d.opt_g.zero_grad(set_to_none=True)
        with acc.step() as st:
            z, c = d.latents(acc.R)
            x = d.generator(z, c)
            st.backward(st.objective(x, c, d.rng), x)
        out.append(st.components)
    return out


def summary(v: list[float]) -> str:
    """Mean +- its standard error, and the median."""
    se = statistics.stdev(v) / math.sqrt(len(v))
    return f"{statistics.mean(v):.3g} +- {se:.2g} (median {statistics.median(v):.3g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--probes", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)

    def on_step(step, d, acc, st) -> None:
        if st.components is not None:
            print(f"step {step:4d}: the run's probe at ({st.R}, {st.K}): between {st.components[0]:.3g}, "
                  f"within {st.components[1]:.3g}", flush=True)
        if step % args.every == 0:
            probes = frozen_probes(d, acc, args.probes)
            b, w = (summary([c[i] for c in probes]) for i in (0, 1))
            print(f"step {step:4d}: {args.probes} probes at this state: between {b}, within {w}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        snap = distill_snapshot(args.seed, args.steps, Path(tmp), on_step)
    print(f"the allocator's components at the end: between {snap.alloc.between:.3g}, within {snap.alloc.within:.3g}; "
          f"(R, K) = ({snap.alloc.R}, {snap.alloc.K})")


if __name__ == "__main__":
    main()
