"""The GPU check: what every speed option costs on a GPU, in one command (run through benchmarks/gpu_check.sh).

    benchmarks/gpu_check.sh [--out DIR] [--data DIR] [--budget S] [--rounds N] [--dry-run]

Writes gpu_check.json and gpu_check.md into --out (default: $OUT, else ./gpu_check_out), rewritten after every
step, so a run that is killed still leaves what it measured. Steps, each in its own process with a time limit (a
failing or slow one is recorded as error or timeout and the others go on; once the total --budget is spent the rest
are recorded as skipped):

1. the machine: GPUs, torch, CUDA and cuDNN versions;
2. `pytest -m cuda` (tests/test_cuda.py; they skip without CUDA);
3. seconds per round and peak GPU memory of FedKTL (StyleGAN-XL) on the CIFAR-10 subset with the HtFE8 family and
   20 clients: sequential; -pc 2 with one worker per GPU (where two GPUs exist); 2 and 4 workers sharing one GPU
   (--workers_per_gpu); --amp bf16; --offload; --compile; and Local with the same clients as the floor.

The federated dataset is made from the CIFAR-10 subset in --data (default ../shared/data/cifar10 beside the
repository: a folder holding one .npz with x uint8 (N,32,32,3) and y, or the .npz itself) by fldata, as
`python dataset/generate_Cifar10.py --root <the .npz> --num-clients 20` makes it; the generator is the project's
own compact StyleGAN with random weights in StyleGAN-XL's shape (1000 classes, w_dim 512, 64 px), written as a
network pickle and loaded through -GPath like the real one. Both live in a temporary folder that is removed at the
end. --dry-run does all of it on the CPU at tiny sizes (the 1,000-image CIFAR-10 fixture of ../shared/data/minis,
4 clients of the CPU family, 10 shots per class, a 32 px generator, 2 server epochs), with the same keys; without
the CIFAR-10 data it falls back to scikit-learn's digits. Seconds per round are those of the rounds after the first (the first holds warm-up and compilation: it is
reported apart)."""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10")
# The dry run's default: the 1,000-image CIFAR-10 fixture beside it (the 10,000 images cost the CPU minutes).
DEFAULT_DRY_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "minis", "cifar10_mini_100perclass.npz")
REPORT = "gpu_check.json"
TABLE = "gpu_check.md"
MEMORY_POLL_S = 0.1


@dataclass(frozen=True)
class Scale:
    """The sizes of one kind of check: the paper's (on a GPU) or the dry run's (tiny, on the CPU)."""
    clients: int
    family: str
    feature_dim: int
    rounds: int
    server_epochs: int
    server_batch: int
    generator_px: int
    shots: int  # training samples per class per client (0: all)
    budget_s: int  # the whole check
    pytest_limit_s: int
    config_limit_s: int  # one configuration


FULL = Scale(clients=20, family="HtFE8", feature_dim=512, rounds=2, server_epochs=100, server_batch=100,
             generator_px=64, shots=0, budget_s=450, pytest_limit_s=150, config_limit_s=150)
DRY = Scale(clients=4, family="HtCPU4", feature_dim=64, rounds=2, server_epochs=2, server_batch=8,
            generator_px=32, shots=10, budget_s=270, pytest_limit_s=90, config_limit_s=60)

# (name, algorithm, extra flags, GPUs it needs), in the order they run: the most telling first, since the budget
# may end the check before the last. "fedktl" is also the one-worker case of the workers-per-GPU series.
CONFIGS = (
    ("fedktl", "FedKTL-stylegan-xl", [], 1),
    ("local", "Local", [], 1),
    ("fedktl_bf16", "FedKTL-stylegan-xl", ["--amp", "bf16"], 1),
    ("fedktl_offload", "FedKTL-stylegan-xl", ["--offload", "1"], 1),
    ("fedktl_2_workers_1_gpu", "FedKTL-stylegan-xl", ["-pc", "2", "--workers_per_gpu", "2"], 1),
    ("fedktl_4_workers_1_gpu", "FedKTL-stylegan-xl", ["-pc", "4", "--workers_per_gpu", "4"], 1),
    ("fedktl_pc2_2_gpus", "FedKTL-stylegan-xl", ["-pc", "2", "--workers_per_gpu", "1"], 2),
    ("fedktl_compile", "FedKTL-stylegan-xl", ["--compile", "1"], 1),
)


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def progress(message):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment():
    import torch
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "device": gpus[0] if gpus else "cpu",
        "gpu_count": len(gpus),
        "gpus": gpus,
        "gpu_memory_gib": [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                           for i in range(len(gpus))],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }


def data_archive(data):
    """The .npz of --data (the file, or the one .npz in the folder); None when there is none."""
    if os.path.isfile(data):
        return data
    if os.path.isdir(data):
        archives = sorted(name for name in os.listdir(data) if name.endswith(".npz"))
        if archives:
            return os.path.join(data, archives[0])
    return None


def prepare(work, data, scale):
    """The federated dataset and the generator pickle in `work`; returns (dataset name, dataset dir, pickle,
    where the images came from)."""
    import torch

    from compact_stylegan import CompactGenerator
    from fldata.cli import GenerationOptions, generate
    from fldata.sources import CIFAR10, DIGITS
    from generator_io import save_generator_pickle

    archive = data_archive(data)
    spec, source = (CIFAR10, archive) if archive else (DIGITS, "scikit-learn digits (no CIFAR-10 subset in --data)")
    datasets = os.path.join(work, "datasets")
    generate(spec, GenerationOptions(num_clients=scale.clients, root=archive, out=os.path.join(datasets, spec.name)))
    torch.manual_seed(0)
    # StyleGAN-XL's ImageNet generator: 1000 classes, w_dim 512, 64 px (stylegan/stylegan-xl-models/README.md).
    generator = CompactGenerator(z_dim=512, w_dim=512, c_dim=1000, img_resolution=scale.generator_px, img_channels=3)
    path = os.path.join(work, f"stylegan_xl_shaped_{scale.generator_px}px.pkl")
    save_generator_pickle(generator, path)
    return spec.name, datasets, path, source


def config_argv(algorithm, flags, dataset, dataset_dir, generator, results, scale, device):
    argv = ["-algo", algorithm, "-data", dataset, "-nb", "10", "-nc", str(scale.clients), "-m", scale.family,
            "-fd", str(scale.feature_dim), "-gr", str(scale.rounds), "-dev", device, "--dataset_dir", dataset_dir,
            "--results_dir", results, "--image_every", "0", "--client_state", "memory", "--shots", str(scale.shots)]
    if algorithm.startswith("FedKTL"):
        argv += ["-gen", "stylegan-xl", "-GPath", generator, "-se", str(scale.server_epochs),
                 "-sbs", str(scale.server_batch)]
    if device == "cpu":
        argv += ["--num_threads", "1"]
    return argv + flags


class DevicePeak:
    """The most memory in use on GPU `index` (every process on it: -pc workers, CUDA contexts), polled."""

    def __init__(self, index):
        import torch
        self.torch, self.index, self.peak = torch, index, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while not self.stop.is_set():
            free, total = self.torch.cuda.mem_get_info(self.index)
            self.peak = max(self.peak, total - free)
            self.stop.wait(MEMORY_POLL_S)

    def close(self):
        self.stop.set()
        self.thread.join()
        return self.peak


def measure(result_path, argv):
    """One configuration, in this process (the child the check starts): runs main.py's experiment for `argv` and
    writes its seconds per round and peak memory to `result_path`, after every round (so a run stopped at its time
    limit still tells how far it got) and at the end with `complete`; returns main.py's exit status."""
    import numpy as np
    import torch

    from flcore.errors import UserError
    from flcore.history import History
    from flutils import experiment
    from flutils.options import parse_args

    settings = parse_args(argv).run
    cuda = settings.device == "cuda" and torch.cuda.is_available()
    index = int(settings.device_id)
    sampler = DevicePeak(index) if cuda else None
    start = time.perf_counter()
    rounds = []

    def write(complete, history=None):
        result = {
            "complete": complete,
            "run_s": time.perf_counter() - start,
            "round_seconds": rounds,
            "first_round_s": rounds[0] if rounds else None,
            "seconds_per_round": float(np.mean(rounds[1:] or rounds)) if rounds else None,
            "peak_allocated_mib": torch.cuda.max_memory_allocated(index) / 2**20 if cuda else None,
            "peak_device_used_mib": sampler.peak / 2**20 if cuda else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "final_test_acc": float(history.values["rs_test_acc"][-1]) if history else None,
        }
        with open(result_path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(result_path + ".tmp", result_path)

    record_round = History.record_round
    histories = []

    def recorded(history, seconds, *args, **kwargs):
        record_round(history, seconds, *args, **kwargs)
        rounds.append(float(seconds))
        histories[:] = [history]
        write(False)
    History.record_round = recorded
    try:
        experiment.run_experiment(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if sampler:
            sampler.close()
    write(True, histories[0] if histories else None)
    return 0


def run_limited(command, log_path, limit, env=None):
    """Runs `command` (output to `log_path`) in its own process group, killed whole (with any -pc workers) after
    `limit` seconds; returns (exit status or None on timeout, seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
    return status, time.perf_counter() - start


def last_error(log_path):
    """The line that says why a step failed: its `error: ...` line, else the last line of its output."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error: ") or "Error" in line.split(":")[0]]
    return (errors or lines or ["(no output)"])[-1][:500]


def run_config(name, argv, work, logs, limit):
    """One configuration in a child process; its record for the report."""
    result_path = os.path.join(work, f"{name}.json")
    log_path = os.path.join(logs, f"{name}.log")
    # A compile cache of its own: a compilation killed at its limit can leave truncated files that would break the
    # next configuration (or the user's later runs) reading a shared cache.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor", name)}
    status, seconds = run_limited([sys.executable, os.path.abspath(__file__), "measure", result_path, "--", *argv],
                                  log_path, limit, env=env)
    record = {"argv": argv, "wall_s": round(seconds, 1), "limit_s": round(limit)}
    if os.path.isfile(result_path):  # complete, or the rounds measured before a time limit or an error
        with open(result_path) as f:
            record.update(json.load(f))
    if status is None:
        return {**record, "status": "timeout", "error": f"did not finish in {limit:.0f} s"}
    if status != 0 or not record.get("complete"):
        return {**record, "status": "error", "error": last_error(log_path)}
    return {**record, "status": "ok"}


def run_pytest(work, logs, limit):
    """`pytest -m cuda`: the CUDA tests' counts from its JUnit report."""
    junit = os.path.join(work, "pytest_cuda.xml")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    log_path = os.path.join(logs, "pytest_cuda.log")
    status, seconds = run_limited(command, log_path, limit)
    record = {"command": "python -m pytest -q -m cuda tests", "wall_s": round(seconds, 1), "exit_code": status}
    if status is None:
        return {**record, "status": "timeout", "error": f"did not finish in {limit:.0f} s"}
    if not os.path.isfile(junit):
        return {**record, "status": "error", "error": last_error(log_path)}
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = counts["failures"] + counts["errors"]
    # pytest exits 5 when nothing is selected; all skipped (no CUDA) exits 0.
    verdict = "failed" if failed else "passed" if passed else "skipped"
    return {**record, "status": verdict, "passed": passed, "failed": failed, "skipped": counts["skipped"],
            **({"error": last_error(log_path)} if failed else {})}


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report):
    env = report["environment"]
    lines = [f"# GPU check{' (dry run, CPU, tiny sizes)' if report['dry_run'] else ''}", "",
             f"{env.get('device', '?')} x {env.get('gpu_count', 0)}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}; {report['started']}; {fmt(report.get('wall_s'), 0)} s in all"
             f"{'' if report.get('finished') else ' (unfinished)'}", ""]
    setup = report.get("setup", {})
    if "error" in setup:
        lines += [f"setup failed: {setup['error']}", ""]
    elif setup:
        lines += [f"{setup['clients']} clients of {setup['family']}, {setup['rounds']} rounds, data: {setup['data']}; "
                  f"generator: {setup['generator']}", ""]
    tests = report.get("pytest_cuda")
    if tests:
        lines += [f"`pytest -m cuda`: {tests['status']} ({tests.get('passed', 0)} passed, {tests.get('failed', 0)} "
                  f"failed, {tests.get('skipped', 0)} skipped, {fmt(tests['wall_s'], 0)} s)", ""]
    lines += ["| configuration | status | s per round | first round s | peak allocated MiB | peak GPU in use MiB "
              "| flags |", "|---|---|---|---|---|---|---|"]
    for name, record in report["configs"].items():
        status = f"{record['status']}: {record['error']}" if record.get("error") else record["status"]
        lines.append(f"| {name} | {status.replace('|', '/')} | {fmt(record.get('seconds_per_round'))} | "
                     f"{fmt(record.get('first_round_s'))} | {fmt(record.get('peak_allocated_mib'), 0)} | "
                     f"{fmt(record.get('peak_device_used_mib'), 0)} | {' '.join(record.get('flags', []))} |")
    return "\n".join(lines) + "\n"


def write_report(out, report):
    """The JSON and the table, each written whole and renamed into place."""
    for name, text in ((REPORT, json.dumps(report, indent=1)), (TABLE, markdown(report))):
        temporary = os.path.join(out, name + ".tmp")
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, os.path.join(out, name))


def check(out, data, scale, dry_run, names=None):
    """The whole check (or the configurations `names`); returns the report."""
    started = time.perf_counter()
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = environment()
    device = "cpu" if dry_run else "cuda"
    report = {"dry_run": dry_run, "started": now(), "finished": None, "wall_s": None, "environment": env,
              "scale": asdict(scale), "setup": {}, "pytest_cuda": None, "configs": {}}
    selected = [c for c in CONFIGS if names is None or c[0] in names]
    for name, _, flags, _ in selected:
        report["configs"][name] = {"status": "pending", "flags": flags}
    write_report(out, report)
    progress(f"{env['device']} x {env['gpu_count']}, torch {env['torch']}, CUDA {env['cuda']}; "
             f"budget {scale.budget_s} s")
    remaining = lambda: scale.budget_s - (time.perf_counter() - started)  # noqa: E731
    work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        try:
            dataset, dataset_dir, generator, source = prepare(work, data, scale)
        except Exception as exc:  # noqa: BLE001 - recorded: nothing can be measured without the data
            report["setup"] = {"error": f"{type(exc).__name__}: {exc}"}
            for record in report["configs"].values():
                record.update(status="skipped", error="no dataset or generator (see setup)")
            progress(f"setup failed: {report['setup']['error']}")
            return report
        report["setup"] = {"data": source, "dataset": dataset, "clients": scale.clients, "family": scale.family,
                           "rounds": scale.rounds,
                           "generator": f"random-weight compact StyleGAN, StyleGAN-XL-shaped (1000 classes, "
                                        f"w_dim 512, {scale.generator_px} px)"}
        progress(f"data {source}: {scale.clients} clients; generator written")
        write_report(out, report)
        if names is None:
            progress("pytest -m cuda")
            report["pytest_cuda"] = run_pytest(work, logs, min(scale.pytest_limit_s, remaining()))
            progress(f"pytest -m cuda: {report['pytest_cuda']['status']}")
            write_report(out, report)
        for name, algorithm, flags, gpus in selected:
            record = report["configs"][name]
            if not dry_run and env["gpu_count"] < gpus:
                record.update(status="skipped", error=f"needs {gpus} GPUs, {env['gpu_count']} here")
            elif remaining() < 10:
                record.update(status="skipped", error="the time budget was spent")
            else:
                progress(f"{name} ...")
                argv = config_argv(algorithm, flags, dataset, dataset_dir, generator,
                                   os.path.join(work, "results", name), scale, device)
                record.update(run_config(name, argv, work, logs, min(scale.config_limit_s, remaining())))
                progress(f"{name}: {record['status']}, {fmt(record.get('seconds_per_round'))} s per round")
            write_report(out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report["finished"] = now()
        report["wall_s"] = round(time.perf_counter() - started, 1)
        write_report(out, report)
    progress(f"done in {report['wall_s']:.0f} s: {os.path.join(out, REPORT)}")
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["measure"]:
        return measure(argv[1], argv[3:])
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="folder for gpu_check.json, gpu_check.md and logs/ (default: $OUT, else gpu_check_out)")
    parser.add_argument("--data",
                        help="the CIFAR-10 subset: a folder with one .npz (x uint8 N,32,32,3; y), or the .npz "
                             "(default: ../shared/data/cifar10 beside the repository; dry run: "
                             "../shared/data/minis/cifar10_mini_100perclass.npz)")
    parser.add_argument("--dry-run", action="store_true", help="everything on the CPU at tiny sizes")
    parser.add_argument("--budget", type=int, help="seconds for the whole check (default: 450, dry run 270)")
    parser.add_argument("--rounds", type=int, help="training rounds per configuration (default: 2)")
    parser.add_argument("--only", nargs="+", choices=[c[0] for c in CONFIGS],
                        help="just these configurations (no pytest)")
    args = parser.parse_args(argv)
    if (args.budget is not None and args.budget < 1) or (args.rounds is not None and args.rounds < 1):
        parser.error("--budget and --rounds must be >= 1")
    scale = DRY if args.dry_run else FULL
    if args.budget is not None:
        scale = Scale(**{**asdict(scale), "budget_s": args.budget})
    if args.rounds is not None:
        scale = Scale(**{**asdict(scale), "rounds": args.rounds})
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    data = args.data or (DEFAULT_DRY_DATA if args.dry_run else DEFAULT_DATA)
    check(os.path.abspath(args.out), os.path.abspath(data), scale, args.dry_run, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
