"""Markdown table of finished runs from their .h5 files: best accuracy (mean +- std over runs), upload and
download floats per round (the paper's Table 5), seconds per round and the rounds the scores cover; --plot draws
each algorithm's mean accuracy curve.

    python system/results_table.py --dataset Digits --goal small [--results_dir results] [--out table.md]
        [--plot curves.png]

Several goals (one configuration each) give one row per algorithm and goal; --rounds R scores each run by its
best evaluation up to round R (a 60-round run also answers for 10 and 30 rounds).
"""
import argparse
import glob
import os
import re
import sys

import numpy as np

from flcore.algorithms import ALGORITHMS
from flcore.paths import RESULTS_DIR
from flutils.results import read_h5
from flutils.visualize import save_figure


def collect(results_dir, dataset, goal):
    """{algorithm: [h5 contents per run]} for every run file of this dataset and goal."""
    pattern = re.compile(rf"^{re.escape(dataset)}_(.+)_{re.escape(goal)}_(\d+)\.h5$")
    runs = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.h5"))):
        match = pattern.match(os.path.basename(path))
        if match:
            runs.setdefault(match.group(1), []).append(read_h5(path))
    return runs


def accuracy_up_to(data, rounds=None):
    """A run's test accuracies over its evaluations, or over those up to round `rounds`."""
    accuracy = data["rs_test_acc"]
    if rounds is not None:
        accuracy = accuracy[data["eval_rounds"] <= rounds]
    return accuracy


def best_accuracy(data, rounds=None):
    """A run's best test accuracy over its evaluations, or over those up to round `rounds`."""
    return accuracy_up_to(data, rounds).max()


def last_value(data, key):
    """A per-round measurement's value in the last round that has it (nan when the run has none)."""
    values = data.get(key, np.array([]))
    values = values[np.isfinite(values)]
    return values[-1] if len(values) else np.nan


def metric_value(data, spec):
    """A per-round measurement of one run, by spec: 'name' (its last round), 'name@R' (round R) or 'name@mean'
    (the mean over the rounds that have it)."""
    key, _, when = spec.partition("@")
    if not when:
        return last_value(data, key)
    values = np.asarray(data.get(key, np.array([])), dtype=float)
    if when == "mean":
        values = values[np.isfinite(values)]
        return values.mean() if len(values) else np.nan
    round_index = int(when)
    return values[round_index] if round_index < len(values) else np.nan


def metric_header(spec):
    key, _, when = spec.partition("@")
    return f"{key} ({'last round' if not when else 'mean over rounds' if when == 'mean' else f'round {when}'})"


def check_metric(spec):
    when = spec.partition("@")[2]
    if when and when != "mean" and not when.isdigit():
        raise argparse.ArgumentTypeError(f"metric '{spec}': write name, name@ROUND or name@mean")
    return spec


def tail_accuracy(data, tail, rounds=None):
    """A run's mean test accuracy over its last `tail` evaluations (up to round `rounds`): less sensitive to
    one lucky round than the best."""
    return accuracy_up_to(data, rounds)[-tail:].mean()


def rounds_scored(data, rounds=None):
    """The last round a run's scores cover: its last evaluation, or its last one up to round `rounds`."""
    evaluated = data["eval_rounds"]
    if rounds is not None:
        evaluated = evaluated[evaluated <= rounds]
    return int(evaluated.max()) if len(evaluated) else 0


def rounds_cell(data_list, rounds=None):
    """The rounds column: one number when the runs agree, else each distinct one ("3 / 10")."""
    return " / ".join(str(r) for r in sorted({rounds_scored(d, rounds) for d in data_list}))


def algorithm_order(runs):
    return [name for name in ALGORITHMS if name in runs] + sorted(set(runs) - set(ALGORITHMS))


def table(runs, rounds=None, metrics=(), tail=0):
    order = algorithm_order(runs)
    tail_header = f" mean test accuracy, last {tail} evaluations (%) |" if tail else ""
    lines = ["| algorithm | best test accuracy (%) |" + tail_header + " runs | upload / round (M floats) | "
             "download / round (M floats) | s / round | rounds |" + "".join(f" {metric_header(m)} |" for m in metrics),
             "|---|---|---|---|---|---|---|" + "---|" * (len(metrics) + bool(tail))]
    for name in order:
        data = runs[name]
        best = np.array([best_accuracy(d, rounds) for d in data]) * 100
        tail_cell = ""
        if tail:
            late = np.array([tail_accuracy(d, tail, rounds) for d in data]) * 100
            tail_cell = f" {late.mean():.2f} +- {late.std():.2f} |"
        upload = np.mean([d["upload_floats"].mean() for d in data if len(d["upload_floats"])]) / 1e6
        download = np.mean([d["download_floats"].mean() for d in data if len(d["download_floats"])]) / 1e6
        seconds = np.mean([d["round_time"].mean() for d in data if len(d["round_time"])])
        extra = "".join(f" {np.mean([metric_value(d, m) for d in data]):.3f} |" for m in metrics)
        lines.append(f"| {name} | {best.mean():.2f} +- {best.std():.2f} |{tail_cell} {len(data)} | {upload:.4f} | "
                     f"{download:.4f} | {seconds:.2f} | {rounds_cell(data, rounds)} |{extra}")
    return "\n".join(lines)


def mean_curve(data_list, rounds=None):
    """(rounds, mean test accuracy in %) over the runs, on the evaluation rounds they share."""
    curves = []
    for data in data_list:
        keep = data["eval_rounds"] <= (rounds if rounds is not None else np.inf)
        curves.append((data["eval_rounds"][keep], data["rs_test_acc"][keep]))
    length = min(len(x) for x, _ in curves)
    return curves[0][0][:length], np.mean([y[:length] for _, y in curves], axis=0) * 100


def plot_curves(path, runs, rounds=None, title=""):
    """Each algorithm's mean test-accuracy curve over its runs, in one figure. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in algorithm_order(runs):
        x, y = mean_curve(runs[name], rounds)
        ax.plot(x, y, marker=".", label=f"{name} ({len(runs[name])} run{'s' if len(runs[name]) > 1 else ''})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%), mean over runs")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="Digits")
    p.add_argument("--goal", nargs="+", default=["test"], help="one or more goals (-go of main.py)")
    p.add_argument("--rounds", type=int, default=None, help="score runs by their best evaluation up to this round")
    p.add_argument("--metrics", nargs="*", default=[], type=check_metric,
                   help="per-round measurements to add as columns, mean over runs of: the last round's value "
                        "(name), round R's (name@R) or the mean over rounds (name@mean), e.g. image_distance@0 "
                        "grad_cosine@mean")
    p.add_argument("--tail", type=int, default=0,
                   help="add a column: mean test accuracy over each run's last N evaluations (0: none)")
    p.add_argument("--results_dir", default=RESULTS_DIR)
    p.add_argument("--out", default="", help="also write the table to this file")
    p.add_argument("--plot", default="", metavar="FILE.png",
                   help="also draw each algorithm's mean test-accuracy curve (over its runs) into this image")
    args = p.parse_args(argv)
    if args.tail < 0:
        print(f"error: --tail must be >= 0, got {args.tail}", file=sys.stderr)
        return 2
    if args.plot and not args.plot.lower().endswith(".png"):
        print(f"error: --plot {args.plot}: name a .png file", file=sys.stderr)
        return 2
    runs = {}
    for goal in args.goal:
        found = collect(args.results_dir, args.dataset, goal)
        if not found:
            print(f"error: no {args.dataset}_*_{goal}_<run>.h5 files in {args.results_dir}; "
                  f"run main.py with -data {args.dataset} -go {goal} first", file=sys.stderr)
            return 2
        label = (lambda name: name) if len(args.goal) == 1 else (lambda name: f"{name} [{goal}]")
        runs.update({label(name): data for name, data in found.items()})
    text = table(runs, args.rounds, args.metrics, args.tail)
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.out + ".tmp", args.out)
    if args.plot:
        plot_curves(args.plot, runs, args.rounds, f"{args.dataset}, goal {', '.join(args.goal)}")
        print(f"curves: {args.plot}")
    return 0
