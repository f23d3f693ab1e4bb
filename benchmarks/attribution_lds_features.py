"""Extra workers for the features of ``carv bench attribution --lds`` (they share its run folder's feature files).

    python benchmarks/attribution_lds_features.py RUN_DIR --worker 1/3

Each worker claims a (method, budget, replicate) file before computing it; ``carv bench attribution --lds --out
RUN_DIR`` computes whatever is still missing and then the LDS. Default configuration only (as the command's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from carv.bench.attribution_lds import LdsBenchConfig, LdsProblem, compute_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--worker", default="0/1", help="i/n: this process is worker i of n")
    args = ap.parse_args()
    torch.set_num_threads(1)
    i, n = (int(v) for v in args.worker.split("/"))
    compute_features(LdsProblem(LdsBenchConfig(threads=1)), Path(args.run_dir), worker=i, workers=n)


if __name__ == "__main__":
    main()
