"""One experiment: every run of a configuration (-t), each a server with its clients simulated in this process,
then the summary over runs. system/main.py is its command line."""
import json
import os
import shlex
import signal
import sys
import threading

import torch

from flcore.errors import UserError, out_of_memory
from flcore.load_cache import LoadCache
from flcore.parallel import ClientPool
from flcore.paths import REPO_ROOT
from flcore.runner import Runner, run_name
from flcore.trainmodel import family_models
from flutils.config_file import write_config
from flutils.data import load_federated_dataset
from flutils.options import parse_args
from flutils.results import experiment_name, plot_accuracy, summarize, write_h5, write_summary
from flutils.tracking import check_logger, open_tracker
from flutils.visualize import save_image_grid


def resolve_device(args):
    """-dev auto (the default) takes CUDA when there is one, silently; -dev cuda without CUDA says it falls back."""
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{args.device_id}")
    if args.device == "cuda":
        print("CUDA is not available here: running on the CPU (pass -dev cpu or -dev auto to silence this).")
    return torch.device("cpu")


def check_device_flags(args, device):
    """The speed flags that need CUDA, checked once the device is known; sets cuDNN's algorithm search."""
    if args.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA (its grad scaler and fast kernels are CUDA's); use --amp bf16 on the "
                        "CPU")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark


def run_experiment(config):
    """All runs of one configuration (flcore/settings.py: Config); returns the summary over runs."""
    check_logger(config.run.logger)
    threads = torch.get_num_threads()
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    try:
        return run_all(config)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) get their setting back


def image_saver(args, run, tracker):
    """The runner's image sink: an algorithm's images of a round saved as a captioned grid every --image_every
    rounds and after the last one, and sent to `tracker` (--logger)."""
    folder = os.path.join(args.results_dir, run_name(args, run) + "_images")

    def save(round_index, images, captions):
        every = args.image_every
        if every and ((round_index + 1) % every == 0 or round_index + 1 == args.global_rounds):
            path = os.path.join(folder, f"round_{round_index:04d}.png")
            save_image_grid(path, images, captions,
                            title=f"{args.algorithm}, run {run}: round {round_index} of {args.global_rounds}")
            tracker.image(round_index, path)
    return save


def start_run(config, run, dataset, device, cache, engine):
    """(runner, tracker) of run `run`: the tracker (--logger) observes the runner's history; a runner that cannot
    be built closes the tracker before the error goes on."""
    args = config.run
    tracker = open_tracker(config, run_name(args, run), experiment_name(args))
    try:
        return Runner(config, dataset, run, device, cache, engine=engine, image_sink=image_saver(args, run, tracker),
                      observer=tracker), tracker
    except BaseException:
        tracker.close()
        raise


def run_all(config):
    """Every run of the configuration, then the summary over them (see run_experiment)."""
    args = config.run
    device = resolve_device(args)
    check_device_flags(args, device)
    try:
        family = family_models(args.model_family)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    dataset = load_federated_dataset(args)
    print(f"{args.algorithm} on {args.dataset} ({args.num_clients} clients, image {dataset.image_shape}), "
          f"family {args.model_family} = {family}, {args.global_rounds} rounds, device {device}")

    histories = []
    cache = LoadCache()
    for run in range(args.prev, args.times):
        try:
            runner, tracker = start_run(config, run, dataset, device, cache, client_pool(args))
            try:
                histories.append(train_and_write(config, run, runner))
            finally:
                try:
                    runner.close()
                finally:
                    tracker.close()
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc) from None
    return summarize_runs(args, histories)


def save_config(config):
    """The resolved configuration beside the results, once the first run has started (a run refused for bad input
    writes nothing): `main.py --config` of it reruns the experiment."""
    name = experiment_name(config.run)
    path = os.path.join(config.run.results_dir, name + ".toml")
    write_config(path, config, name)
    print(f"configuration written to {path}")


def client_pool(args):
    """With -pc N > 1: N worker processes (at most one per client), sharing this process's CPU threads."""
    workers = min(args.parallel_clients, args.num_clients)
    if workers == 1:
        return None
    return ClientPool(workers, threads=max(1, torch.get_num_threads() // workers))


def train_and_write(config, run, runner):
    """One started run (any engine): resumed when asked, the configuration saved with the first run, trained, and
    its results written; returns its history."""
    if config.run.resume:
        runner.resume()
    if run == config.run.prev:
        save_config(config)
    return write_run(config, run, runner, runner.train())


def write_run(config, run, runner, history):
    """One run's results as .h5 (what results_table.py reads); returns the history."""
    path = os.path.join(config.run.results_dir, run_name(config.run, run) + ".h5")
    write_h5(history, path, {"args": json.dumps(config.values(), sort_keys=True), "run": run, "seed": runner.seed})
    print(f"run {run}: results written to {path}")
    return history


def summarize_runs(args, histories):
    """The summary over runs (.json) and the accuracy curves (.png); returns the summary."""
    summary = summarize(histories)
    name = experiment_name(args)
    write_summary(os.path.join(args.results_dir, name + ".json"), summary)
    plot_path = os.path.join(args.results_dir, name + ".png")
    plot_accuracy(plot_path, histories, name)
    print(f"best test accuracy over {summary['runs']} run(s): {summary['best_acc_mean'] * 100:.2f} "
          f"+- {summary['best_acc_std'] * 100:.2f} %; {summary['seconds_per_round']:.2f} s per round; "
          f"curve: {plot_path}")
    return summary


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so it stops as Ctrl-C does: engines closed, checkpoints kept."""


def raise_terminated(signum, frame):
    raise Terminated()


def resume_hint(config, argv):
    """What a stopped run prints: the exact command that continues it, when it has a checkpoint to continue from."""
    args = config.run
    checkpoints = [os.path.join(args.save_folder_name, run_name(args, run) + ".pt")
                   for run in range(args.prev, args.times)] if args.save_folder_name else []
    if not any(os.path.isfile(path) for path in checkpoints):
        return "stopped before any checkpoint was written (-sfn DIR keeps one after every round, to resume from)"
    script = os.path.relpath(os.path.join(REPO_ROOT, "system", "main.py"))
    flags = list(argv) if config.run.resume else list(argv) + ["--resume"]
    return f"stopped; continue from the last checkpoint with: python {shlex.join([script] + flags)}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set a signal handler
    previous = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    config = None
    try:
        config = parse_args(argv)
        run_experiment(config)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if config is not None:
            print(f"\n{resume_hint(config, argv)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
