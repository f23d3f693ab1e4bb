"""Same states, two decisions: the distillation allocator's plan with its probes' strata readings against the
plan of the iid model (the same allocator state without them), at each cost ratio of a regime sweep's states.

Where the iid model keeps one draw per sample, the readings (:attr:`carv.accounting.Allocator.strata`) can move
the plan to ``K >= 2``; elsewhere both plans are the same pair. Both plans are scored on the state's fitted
variance curve (:func:`carv.bench.regime.fit_variance_curve`, from the sweep's measured rows: the iid plan's pair
was not always measured) as the sweep scores a measured plan (:func:`carv.bench.regime.mix_row`,
:func:`carv.bench.regime.regime_row`), their probes charged as :func:`regime_sweep.app_choice` charges them, so
the ratio of their ECMs (``iid / strata`` in ``Var * C``) is what the decision alone gains at that state (1.0
where it does not act).
A sweep's own rows compare runs whose training took other paths; this compares the decision at one state.

    PYTHONPATH=src python3 benchmarks/strata_ab.py runs/regime-distill-at80 runs/regime-distill \
        runs/regime-distill-at120 --json ab.json

with the folders of the distillation regime sweep (BENCHMARKS.md) at ``--snapshot-step 80``, ``100`` and ``120``
(``--out runs/regime-distill-at80`` and ``-at120`` for the other two).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from regime_sweep import app_choice, distill_allocator  # noqa: E402

from carv._runfolder import atomic_write_json  # noqa: E402
from carv.bench.regime import fit_variance_curve, mix_row, regime_row  # noqa: E402


def curve_row(curve, R: int, K: int) -> dict:
    """A row of the fitted curve ``R Var = b + w_e / K + w_t / K^3`` at ``(R, K)``, shaped like a measured one."""
    b, we, wt = curve
    return {"R": R, "K": K, "variance": (b + we / K + wt / K ** 3) / R, "variance_se": 0.0}


def curve_ecm(curve, R: int, K: int, mix, cost_ratio: float, overhead: float) -> float:
    """ECM of a plan on the fitted curve, scored as the sweep scores a measured plan: its mix's rows combined by
    :func:`carv.bench.regime.mix_row` and costed by :func:`carv.bench.regime.regime_row` (probes charged by
    ``overhead``), against the curve's own ``(2, 1)`` (the same base for both plans, so their ratio does not
    depend on it)."""
    head = mix_row(curve_row(curve, R, K), curve_row(curve, *mix[:2]) if mix else None, mix[2] if mix else 0.0)
    return regime_row(cost_ratio, 1.0, curve_row(curve, 2, 1), head, curve, overhead)["headline_ecm"]


def compare(folder: Path) -> list[dict]:
    """One row per seed and cost ratio of a regime sweep folder: both plans and the ratio of their ``Var * C``."""
    sweep = json.loads((folder / "regime_sweep.json").read_text())
    rows = []
    for seed in sweep["per_seed"]:
        state = json.loads((folder / f"seed-{seed['seed']}" / "run" / "run.json").read_text())["accountant"]
        curve = fit_variance_curve([r for r in seed["rows"] if r["method"] == "carv"])
        for ratio in seed["ratios"]:
            plans = {}
            for arm, halves in (("strata", state["allocator"].get("halves", [])), ("iid", [])):
                alloc = distill_allocator()
                st = copy.deepcopy(state["allocator"])
                st["halves"] = halves
                alloc.load_state_dict(st)
                R, K, overhead, mix = app_choice(alloc, ratio)
                plans[arm] = {"R": R, "K": K, "mix": mix, "strata": alloc.strata,
                              "ecm": curve_ecm(curve, R, K, mix, ratio, overhead)}
            rows.append({"folder": str(folder), "seed": seed["seed"], "cost_ratio": ratio, **{
                f"{arm}_{k}": v for arm, p in plans.items() for k, v in p.items() if k != "ecm"},
                "gain": plans["strata"]["ecm"] / plans["iid"]["ecm"]})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="regime sweep folders (benchmarks/regime_sweep.py "
                                                          "--app distill --out FOLDER)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    rows = [r for f in args.folders for r in compare(f)]
    for r in rows:
        print(f"{r['folder']} seed {r['seed']} ratio {r['cost_ratio']:5.1f}: strata (R, K) = "
              f"({r['strata_R']}, {r['strata_K']}) [share {r['strata_strata']:.2f}], iid ({r['iid_R']}, "
              f"{r['iid_K']}): gain {r['gain']:.2f}x")
    acts = [r["gain"] for r in rows if (r["strata_R"], r["strata_K"]) != (r["iid_R"], r["iid_K"])]
    if acts:
        geo = math.exp(sum(math.log(g) for g in acts) / len(acts))
        print(f"the decision acts on {len(acts)} of {len(rows)} (state, ratio) pairs: gain {min(acts):.2f}-"
              f"{max(acts):.2f}x there (geometric mean {geo:.2f}x); elsewhere 1.00x")
    else:
        print(f"the decision acts on none of {len(rows)} (state, ratio) pairs")
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
