"""Record every result curve of a fixed set of runs, or compare them with a recording, bit for bit.

A refactor changes no result: run `python benchmarks/record_curves.py --out before.npz` before the first edit and
`python benchmarks/record_curves.py --out after.npz --compare before.npz` after it. The runs: the default run; every
algorithm of system/run_small.sh for 2 rounds; FedKTL with -pc 2; with --client_state disk; a run killed (SIGKILL)
after its first checkpoint and resumed; and FedProto through Flower's simulation engine (`flwr run`). Every run
uses one CPU thread, so float reductions happen in the same order. Wall-clock series (times) are not compared.
"""
import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "system", "main.py")
SMALL_ALGOS = ("Local", "FedDistill", "FML", "LG-FedAvg", "FedGen", "FedProto", "FedKD", "FedGH", "FedTGP", "FedMRL",
               "FedL2G-feat", "FedL2G-logit", "FedKTL-stylegan-3", "FedFTG", "FGL")
# Series that measure wall-clock time differ between any two runs.
TIMING = ("round_time",)


def small_flags(algo, data_dir, work):
    flags = ["-data", "Digits10", "-nb", "10", "-nc", "10", "-m", "HtCPU4", "-algo", algo, "-gr", "2", "-t", "1",
             "-lbs", "10", "-lr", "0.01", "-fd", "512", "-dev", "cpu", "-go", "small", "--image_every", "0",
             "--num_threads", "1", "--dataset_dir", data_dir]
    if algo == "FedFTG":
        flags += ["-m", "tiny_cnn", "--ftg_generator_width", "32"]
    if algo == "FGL":
        flags += ["-m", "tiny_cnn", "-GPath", os.path.join(work, "tiny_sd"), "--sd_steps", "5", "-gbs", "20",
                  "--fgl_images_per_class", "100", "--fgl_server_epochs", "20"]
    return flags


def main_py(flags, results_dir):
    done = subprocess.run([sys.executable, MAIN, *flags, "--results_dir", results_dir],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"run failed: {' '.join(flags)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def killed_and_resumed(flags, results_dir, checkpoints):
    """SIGKILL once the first checkpoint exists, then rerun the same command with --resume."""
    run = subprocess.Popen([sys.executable, MAIN, *flags, "--results_dir", results_dir, "-sfn", checkpoints],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not glob.glob(os.path.join(checkpoints, "*.pt")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    if glob.glob(os.path.join(results_dir, "*.h5")):
        sys.exit("the run finished before it could be killed: raise -gr in killed_and_resumed")
    main_py([*flags, "-sfn", checkpoints, "--resume"], results_dir)


def stop_processes_mentioning(text):
    """Ends the processes whose command line contains `text` (the local SuperLink and SuperExec that `flwr run`
    starts and leaves running, found by their Flower home folder)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except OSError:
                pass


def flower_run(data_dir, results_dir):
    overrides = " ".join(f'{k}="{v}"' for k, v in {
        "algorithm": "FedProto", "dataset_dir": data_dir, "dataset": "Digits", "results_dir": results_dir}.items())
    home = os.path.join(os.path.dirname(results_dir), "flwr_home")
    try:
        done = subprocess.run(["flwr", "run", os.path.join(REPO, "system", "flower"), "local", "--stream",
                               "--federation-config", "num-supernodes=4", "--run-config", overrides],
                              capture_output=True, text=True, timeout=1800, env=dict(os.environ, FLWR_HOME=home))
    finally:
        stop_processes_mentioning(home)
    if done.returncode != 0:
        sys.exit(f"flwr run failed\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def read_curves(results_dir, label):
    curves = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.h5"))):
        with h5py.File(path, "r") as f:
            for key in f.keys():
                if key in TIMING or key.startswith("time_"):
                    continue
                curves[f"{label}/{os.path.basename(path)}/{key}"] = np.asarray(f[key])
    if not curves:
        sys.exit(f"{label}: no results in {results_dir}")
    return curves


def record(work, only):
    subprocess.run([sys.executable, os.path.join(REPO, "dataset", "generate_Digits.py"), "--num-clients", "10",
                    "--out", os.path.join(work, "data", "Digits10")], check=True, capture_output=True)
    subprocess.run([sys.executable, os.path.join(REPO, "dataset", "generate_Digits.py"), "--num-clients", "4",
                    "--out", os.path.join(work, "data", "Digits")], check=True, capture_output=True)
    subprocess.run([sys.executable, os.path.join(REPO, "stable-diffusion", "sd_pipelines", "tiny.py"),
                    os.path.join(work, "tiny_sd")], check=True, capture_output=True)
    data = os.path.join(work, "data")
    ktl = small_flags("FedKTL-stylegan-3", data, work)
    jobs = {"default": lambda out: main_py(["--num_threads", "1", "--dataset_dir", data], out)}
    for algo in SMALL_ALGOS:
        jobs[f"small-{algo}"] = lambda out, a=algo: main_py(small_flags(a, data, work), out)
    jobs["ktl-pc2"] = lambda out: main_py([*ktl, "-pc", "2"], out)
    jobs["ktl-disk"] = lambda out: main_py([*ktl, "--client_state", "disk"], out)
    jobs["ktl-killed-resumed"] = lambda out: killed_and_resumed(
        [*ktl[:ktl.index("-gr") + 1], "4", *ktl[ktl.index("-gr") + 2:]], out, os.path.join(work, "ckpt"))
    jobs["flower-FedProto"] = lambda out: flower_run(data, out)
    curves = {}
    for label, job in jobs.items():
        if only and label not in only:
            continue
        out = os.path.join(work, "results", label)
        start = time.time()
        job(out)
        curves.update(read_curves(out, label))
        print(f"{label}: {time.time() - start:.1f} s", flush=True)
    return curves


def compare(curves, reference):
    missing = sorted(set(reference) - set(curves))
    extra = sorted(set(curves) - set(reference))
    differ = [k for k in sorted(set(reference) & set(curves))
              if reference[k].shape != curves[k].shape or not np.array_equal(reference[k], curves[k], equal_nan=True)]
    for k in differ:
        print(f"DIFFERS {k}: {reference[k].tolist()} -> {curves[k].tolist()}")
    for k in missing:
        print(f"MISSING {k}")
    for k in extra:
        print(f"NEW {k}")
    same = len(set(reference) & set(curves)) - len(differ)
    print(f"{same} curves identical, {len(differ)} differ, {len(missing)} missing, {len(extra)} new")
    return not differ and not missing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help=".npz file the curves are written to")
    parser.add_argument("--compare", help="a recording to compare with; exit 1 if any curve differs or is missing")
    parser.add_argument("--only", nargs="*", default=(), help="run only these labels (e.g. default ktl-pc2)")
    parser.add_argument("--keep", help="keep the runs' files in this folder (default: a temporary folder)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="curves_")
    try:
        curves = record(work, set(args.only))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    np.savez(args.out, **curves)
    print(f"{len(curves)} curves written to {args.out}")
    if args.compare:
        with np.load(args.compare) as reference:
            ok = compare(curves, {k: reference[k] for k in reference.files
                                  if not args.only or k.split("/")[0] in args.only})
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
