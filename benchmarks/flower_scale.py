"""Rounds per minute and peak memory of Flower's simulation engine against main.py, for N clients.

    python benchmarks/flower_scale.py --clients 20 [--rounds 3] [--algorithm FedProto] [--out DIR]

Both engines run the same flags on a Digits split into N equal clients (iid: 100 clients of a Dirichlet split would
leave some without data; HtCPU4, one CPU thread per client). main.py
runs the clients one after another in one process; `flwr run system/flower` runs them as virtual SuperNodes of
the simulation engine (Ray actors, one CPU each: as many clients at once as cores). Peak memory is the largest sum
of resident memory over the process tree that does the work, sampled every 0.2 s (for Flower: the managed local
SuperLink and everything it started, which includes the Ray workers). Prints one markdown row per engine.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from flcore.paths import REPO_ROOT
from fldata.cli import run as generate_dataset
from fldata.sources import DIGITS
from flutils.results import read_h5


def process_tree_rss(roots):
    """Summed VmRSS (bytes) of `roots` and all their descendants, read from /proc."""
    children, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                resident = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
        rss[int(entry)] = resident
    total, stack, seen = 0, list(roots), set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def pids_named(fragment):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if fragment in f.read().replace(b"\0", b" ").decode(errors="replace"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def run_measured(command, roots_of, env=None):
    """(wall seconds, peak summed RSS bytes) of `command`; roots_of(process) names the trees to sample."""
    peak = [0]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process_tree_rss(roots_of(process)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    start = time.perf_counter()
    sampler.start()
    status = process.wait()
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"error: {' '.join(command[:4])} ... exited {status}")
    return time.perf_counter() - start, peak[0]


def rounds_per_minute(results, name):
    data = read_h5(os.path.join(results, name))
    return 60.0 / float(np.mean(data["round_time"])), float(np.max(data["rs_test_acc"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algorithm", default="FedProto")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    options = parser.parse_args(argv)
    out = options.out or tempfile.mkdtemp(prefix="flower_scale_")
    datasets, results = os.path.join(out, "datasets"), os.path.join(out, "results")
    dataset = os.path.join(datasets, "Digits")
    if not os.path.isfile(os.path.join(dataset, "config.json")):
        generate_dataset(DIGITS, ["--num-clients", str(options.clients), "--partition", "iid", "--balance", "1",
                                  "--out", dataset])
    common = {"algorithm": options.algorithm, "dataset": "Digits", "num_clients": options.clients,
              "global_rounds": options.rounds, "dataset_dir": datasets, "results_dir": results,
              "num_threads": 1, "image_every": 0}
    argv_main = [sys.executable, os.path.join(REPO_ROOT, "system", "main.py"), "-dev", "cpu", "-fd", "64",
                 "-go", "main"]
    for key, value in common.items():
        argv_main += [f"--{key}", str(value)]
    main_seconds, main_peak = run_measured(argv_main, lambda p: [p.pid])

    run_config = " ".join(f"{k}={v}" if isinstance(v, int) else f'{k}="{v}"' for k, v in
                          {**common, "goal": "flower"}.items())
    flower = ["flwr", "run", os.path.join(REPO_ROOT, "system", "flower"), "local", "--stream",
              "--run-config", run_config, "--federation-config", f"num-supernodes={options.clients}"]
    flower_seconds, flower_peak = run_measured(
        flower, lambda p: [p.pid, *pids_named("flower-superlink --insecure --simulation")])

    name = f"Digits_{options.algorithm}_{{}}_0.h5"
    print(f"\n{options.algorithm}, {options.clients} clients, {options.rounds} rounds, CPU, {os.cpu_count()} cores; "
          f"folder {out}\n")
    print("| engine | rounds per minute | best accuracy | wall seconds | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for engine, seconds, peak, goal in (("main.py", main_seconds, main_peak, "main"),
                                        ("Flower simulation", flower_seconds, flower_peak, "flower")):
        per_minute, best = rounds_per_minute(results, name.format(goal))
        print(f"| {engine} | {per_minute:.2f} | {100 * best:.2f} % | {seconds:.0f} | {peak / 2 ** 20:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
