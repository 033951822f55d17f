"""Seconds per round split by phase, and peak memory, for one main.py configuration.

    python benchmarks/round_costs.py [main.py flags...]

With no flags it measures the default offline run. Prints a markdown table row per phase.
"""
import os
import resource
import sys

import numpy as np
import torch

from flutils import experiment
from flutils.errors import UserError
from flutils.options import parse_args
from flutils.results import read_h5, run_name

PHASES = ("train", "prototypes", "eval", "align", "generate")


def measure(argv):
    args = parse_args(argv)
    experiment.run_experiment(args)
    data = read_h5(os.path.join(args.results_dir, run_name(args, args.prev) + ".h5"))
    rows = {phase: float(np.mean(data[f"time_{phase}"])) for phase in PHASES if f"time_{phase}" in data}
    rows["whole round"] = float(np.mean(data["round_time"]))
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_cuda_mib = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else 0.0
    return args, rows, peak_rss_mib, peak_cuda_mib, data


def main_cli(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, rows, rss, cuda, data = measure(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nconfiguration: {' '.join(argv) or '(defaults)'}; {len(data['round_time'])} rounds, "
          f"{torch.get_num_threads()} CPU threads")
    print("| phase | seconds per round |\n|---|---|")
    for phase, seconds in rows.items():
        print(f"| {phase} | {seconds:.3f} |")
    print(f"| peak memory (RSS) | {rss:.0f} MiB |")
    if cuda:
        print(f"| peak CUDA memory | {cuda:.0f} MiB |")
    print(f"best test accuracy {data['attrs']['best_acc']:.4f}; "
          f"upload {np.mean(data['upload_floats']):.0f} floats/round, "
          f"download {np.mean(data['download_floats']):.0f} floats/round")
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
