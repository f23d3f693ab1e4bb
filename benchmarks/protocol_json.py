"""Put a benchmark run measured under the protocol into its committed docs/*.json, keeping what it does not make.

    python3 benchmarks/protocol_json.py RUN.json docs/NAME_bench.json [--rerun RUN2.json ...] [--keep KEY ...]

The new file is RUN.json (what ``carv bench ... --json RUN.json`` wrote; an attribution run folder's
``results.json`` is first cut to that form by ``carv.bench.attribution.docs_json``) with:

- ``reruns``: for each ``--rerun`` file (an independent rerun of the same benchmark, e.g. another seed, run
  after the first), its command, machine, date, headline, best-of-N and settings (``carv bench report``'s
  ``NAME:reruns`` block compares the headlines);
- every ``--keep`` key of the old docs file copied as is (entries other commands wrote, e.g.
  ``equal_step_compute`` or ``upstream_strata``);
- the old file's other content, if it was measured before the protocol (no ``headline``), under
  ``before_protocol`` (the withdrawn figures stay tied to a file), or the old ``before_protocol`` kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RERUN_KEYS = ("command", "machine", "date", "headline", "best_of_n", "settings", "headline_per_snapshot", "smoke")


def merge(run: dict, old: dict | None, reruns: list[dict], keep: list[str]) -> dict:
    if "headline" not in run or "best_of_n" not in run:
        raise ValueError("RUN.json: no headline / best_of_n: not measured under the protocol")
    out = dict(run)
    if reruns:
        out["reruns"] = [{k: r[k] for k in RERUN_KEYS if k in r} for r in reruns]
    old = old or {}
    for k in keep:
        if k not in old:
            raise ValueError(f"--keep: the old file has no key {k!r}; it has {sorted(old)}")
        out[k] = old[k]
    if "before_protocol" in old:
        out["before_protocol"] = old["before_protocol"]
    elif old and "headline" not in old:
        out["before_protocol"] = {k: v for k, v in old.items() if k not in keep}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("docs", type=Path)
    ap.add_argument("--rerun", type=Path, action="append", default=[])
    ap.add_argument("--keep", action="append", default=[])
    a = ap.parse_args()
    from carv._runfolder import atomic_write_json

    old = json.loads(a.docs.read_text()) if a.docs.is_file() else None
    run = json.loads(a.run.read_text())
    if "problem" in run and "config" in run:  # an attribution run folder's results.json
        from carv.bench.attribution import docs_json

        run = docs_json(run)
    new = merge(run, old, [json.loads(p.read_text()) for p in a.rerun], a.keep)
    atomic_write_json(a.docs, new)  # an interrupted write leaves the old file
    print(f"{a.docs}: headline {new['headline']['value']:.3f} ({len(new.get('reruns', []))} rerun(s)); kept "
          f"{a.keep + (['before_protocol'] if 'before_protocol' in new else [])}")


if __name__ == "__main__":
    main()
