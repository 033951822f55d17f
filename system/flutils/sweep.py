"""Sweeps: every point of a product of grids over main.py's settings, each point one main.py process with its
results in its own folder (so a point whose results exist is skipped and a killed sweep resumes), then one table
over the points. system/sweep.py is its command line."""
import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from flcore.errors import UserError
from flcore.paths import REPO_ROOT, RESULTS_DIR
from flcore.runner import run_name
from flutils.config_file import check_keys_apply, declared_fields, text_value, unknown_key_error
from flutils.options import parse_args, settings_classes
from flutils.results import experiment_name, read_h5

MAIN = os.path.join(REPO_ROOT, "system", "main.py")
SET_BY_SWEEP = {"results_dir": "each point's folder under --out", "num_threads": "CPU cores // --parallel",
                "times": "use --times"}


def build_parser():
    p = argparse.ArgumentParser(
        prog="sweep.py", usage="%(prog)s [options] --grid KEY=V1,V2,... [--grid ...] [-- MAIN.PY FLAGS]",
        description="Runs main.py at every point of the product of the grids, each point one process with its "
                    "results in its own folder under --out (a point whose results are there is skipped, so a killed "
                    "sweep resumes where it stopped), then writes the table sweep.md and sweep.csv in --out: the "
                    "grid values, best and late accuracy (mean +- std over the runs), seconds per round, "
                    "communication, and the command that reruns each row. Flags after `--` go to every point's main.py (e.g. "
                    "-- --dataset_dir DIR).")
    p.add_argument("--config", metavar="BASE.toml", help="experiment file every point starts from (main.py --config)")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a setting (main.py's long flag name) and its values; several --grid sweep their product")
    p.add_argument("--times", type=int, metavar="N", help="runs per point (main.py -t; default: the base's)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="points run at the same time; each gets max(1, CPU cores // N) torch threads")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "sweep"), metavar="DIR",
                   help="folder of the points' results and of the table (default: results/sweep)")
    p.add_argument("--late", type=int, default=5, metavar="K",
                   help="late accuracy: a run's mean test accuracy over its last K evaluations (a stable end "
                        "point, less lucky than the best), then mean +- std over the runs (default: 5)")
    return p


def parse_grid(text, known):
    """(key, [value text, ...]) of one --grid, each value checked against the key's type."""
    key, sep, values = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not values.strip():
        raise UserError(f"--grid {text!r}: write KEY=V1,V2,... (e.g. --grid mu=0,10,50)")
    if key not in known:
        raise unknown_key_error(key, known, f"--grid {text}")
    if key in SET_BY_SWEEP:
        raise UserError(f"--grid {key}: the sweep sets it ({SET_BY_SWEEP[key]})")
    items = [value.strip() for value in values.split(",")]
    for value in items:
        text_value(key, value, known[key], f"--grid {text}")
    return key, items


@dataclass(frozen=True)
class Point:
    """One point of the sweep: its grid values, main.py's command and the resolved configuration it runs."""
    values: dict
    folder: str
    command: list
    config: object

    @property
    def label(self):
        return " ".join(f"{key}={value}" for key, value in self.values.items())

    def runs(self):
        return range(self.config.run.prev, self.config.run.times)

    def summary_path(self):
        return os.path.join(self.folder, experiment_name(self.config.run) + ".json")

    def done(self):
        """Its results are all there: the summary over the expected number of runs (written last, atomically)."""
        try:
            with open(self.summary_path()) as file:
                return json.load(file).get("runs") == len(self.runs())
        except (OSError, ValueError):
            return False


def folder_name(values):
    """The point's folder: its grid values, in characters any file system takes."""
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", "_".join(f"{key}={value}" for key, value in values.items()))


def make_points(options):
    """Every point of the grids' product, each resolved (and so checked) before anything runs."""
    classes = settings_classes()
    known = declared_fields(classes)
    grids = [parse_grid(text, known) for text in options.grid]
    keys = [key for key, _ in grids]
    repeated = {key for key in keys if keys.count(key) > 1}
    if repeated:
        raise UserError(f"--grid {sorted(repeated)[0]} is given twice; put all its values in one --grid")
    if options.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {options.parallel}")
    if options.late < 1:
        raise UserError(f"--late must be >= 1, got {options.late}")
    threads = max(1, (os.cpu_count() or 1) // options.parallel)
    points, folders = [], {}
    for combination in itertools.product(*(values for _, values in grids)):
        values = dict(zip(keys, combination))
        folder = os.path.join(options.out, folder_name(values))
        argv = (["--config", options.config] if options.config else []) + options.flags \
            + [f"--{key}={value}" for key, value in values.items()] \
            + ([f"--times={options.times}"] if options.times is not None else []) \
            + [f"--results_dir={folder}", f"--num_threads={threads}"]
        config = parse_args(argv)
        check_keys_apply(keys, config, classes, "--grid")
        if folder in folders:
            raise UserError(f"grid points {folders[folder]} and {values} share the folder {folder}; use values "
                            f"that differ in letters or digits")
        folders[folder] = values
        points.append(Point(values, folder, [sys.executable, MAIN, *argv], config))
    return points


def shown_command(point):
    """The command that reruns a point, as one would type it."""
    return shlex.join(["python", os.path.relpath(MAIN), *point.command[2:]])


def run_points(points, parallel):
    """Runs the points whose results are missing, `parallel` at a time, one progress line per start and end;
    returns the labels of those that failed."""
    pending = [point for point in points if not point.done()]
    total = len(points)
    finished = total - len(pending)
    print(f"sweep: {total} points, {finished} already done, {len(pending)} to run, {parallel} at a time",
          flush=True)
    start = time.monotonic()
    running, failed = {}, []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                point = pending.pop(0)
                os.makedirs(point.folder, exist_ok=True)
                log = open(os.path.join(point.folder, "log.txt"), "w")
                process = subprocess.Popen(point.command, stdout=log, stderr=subprocess.STDOUT)
                running[process] = (point, log, time.monotonic())
                print(f"[{time.monotonic() - start:7.1f} s] started  {point.label}  ({len(running)} running, "
                      f"{finished}/{total} done)", flush=True)
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                point, log, began = running.pop(process)
                log.close()
                finished += 1
                if process.returncode != 0:
                    failed.append(point.label)
                status = "finished" if process.returncode == 0 else f"FAILED ({last_line(point)})"
                print(f"[{time.monotonic() - start:7.1f} s] {status}  {point.label}  in "
                      f"{time.monotonic() - began:.1f} s  ({finished}/{total} done)", flush=True)
    finally:  # interrupted: the points still running are stopped (and rerun by the next sweep)
        for process, (_, log, _) in running.items():
            process.terminate()
            process.wait()
            log.close()
    return failed


def last_line(point):
    with open(os.path.join(point.folder, "log.txt")) as file:
        lines = file.read().strip().splitlines()
    return lines[-1] if lines else f"no output; see {point.folder}"


def point_row(point, late):
    """A finished point's numbers: accuracies in %, over its runs."""
    with open(point.summary_path()) as file:
        summary = json.load(file)
    runs = [read_h5(os.path.join(point.folder, run_name(point.config.run, run) + ".h5")) for run in point.runs()]
    late_means = []
    for data in runs:
        acc = data["rs_test_acc"][~np.isnan(data["rs_test_acc"])]
        late_means.append(float(np.mean(acc[-late:])) if len(acc) else math.nan)
    floats = [float(np.sum(data["upload_floats"]) + np.sum(data["download_floats"])) for data in runs]
    return {
        **point.values,
        "best_acc_mean": summary["best_acc_mean"] * 100, "best_acc_std": summary["best_acc_std"] * 100,
        "late_acc_mean": float(np.mean(late_means)) * 100, "late_acc_std": float(np.std(late_means)) * 100,
        "seconds_per_round": summary["seconds_per_round"],
        "communication_floats": float(np.mean(floats)),
        "command": shown_command(point),
    }


def write_table(points, keys, late, out):
    """sweep.csv (plain numbers) and sweep.md (formatted) over the finished points, in grid order; returns the
    paths."""
    rows = [point_row(point, late) for point in points if point.done()]
    csv_path, md_path = os.path.join(out, "sweep.csv"), os.path.join(out, "sweep.md")
    columns = [*keys, "best_acc_mean", "best_acc_std", "late_acc_mean", "late_acc_std", "seconds_per_round",
               "communication_floats", "command"]
    with open(csv_path + ".tmp", "w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    header = [*keys, "best acc (%)", f"late acc, last {late} evals (%)", "s / round",
              "communication (M floats per run)", "command"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [*(str(row[key]) for key in keys),
                 f"{row['best_acc_mean']:.2f} +- {row['best_acc_std']:.2f}",
                 f"{row['late_acc_mean']:.2f} +- {row['late_acc_std']:.2f}",
                 f"{row['seconds_per_round']:.2f}", f"{row['communication_floats'] / 1e6:.3f}",
                 f"`{row['command']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    with open(md_path + ".tmp", "w") as file:
        file.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)
    return md_path, csv_path, len(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    options = build_parser().parse_args(argv[:split])
    options.flags = argv[split + 1:]
    try:
        points = make_points(options)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        failed = run_points(points, options.parallel)
    except KeyboardInterrupt:
        print("sweep interrupted: the same command resumes it (finished points are skipped)", file=sys.stderr)
        return 130
    md_path, csv_path, rows = write_table(points, list(points[0].values), options.late, options.out)
    print(f"table of {rows} point(s): {md_path} and {csv_path}")
    if failed:
        print(f"error: {len(failed)} point(s) failed ({'; '.join(failed)}); their log.txt under {options.out} "
              f"says why, and the next sweep reruns them", file=sys.stderr)
        return 1
    return 0
