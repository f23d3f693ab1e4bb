"""The LDS ground truth of ``carv bench attribution --lds`` (see :mod:`carv.bench.lds_truth`).

    python benchmarks/attribution_lds_truth.py train RUN_DIR     # resumable: trains the models not on disk yet
    python benchmarks/attribution_lds_truth.py train RUN_DIR --worker 1/2   # optional more workers
    python benchmarks/attribution_lds_truth.py outputs RUN_DIR   # writes docs/attribution_lds_truth.safetensors

One thread (``torch.set_num_threads(1)``); run it under ``nice`` in the background on a shared machine.
"""

from __future__ import annotations

import argparse

import torch

from carv.bench.lds_truth import TRUTH_FILE, train_truth_models, write_truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("train", "outputs"))
    ap.add_argument("run_dir")
    ap.add_argument("--n-subsets", type=int, default=None, help="more subset models than the configuration's")
    ap.add_argument("--worker", default="0/1", help="i/n: this process is worker i of n sharing the run folder")
    ap.add_argument("--out", default=str(TRUTH_FILE))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.step == "train":
        train_truth_models(args.run_dir, n_subsets=args.n_subsets, log=lambda s: print(s, flush=True),
                           worker=int(args.worker.split("/")[0]), workers=int(args.worker.split("/")[1]))
    else:
        print(write_truth(args.run_dir, args.out, n_subsets=args.n_subsets))


if __name__ == "__main__":
    main()
