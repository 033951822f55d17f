"""One experiment: every run of a configuration (-t), each a server with its clients simulated in this process,
then the summary over runs. system/main.py is its command line."""
import json
import os
import sys

import torch

from flcore.errors import UserError, out_of_memory
from flcore.load_cache import LoadCache
from flcore.parallel import ClientPool
from flcore.runner import Runner, run_name
from flcore.trainmodel import family_models
from flutils.data import load_federated_dataset
from flutils.options import parse_args
from flutils.results import experiment_name, plot_accuracy, summarize, write_h5, write_summary
from flutils.visualize import save_image_grid


def resolve_device(args):
    if args.device == "cuda":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{args.device_id}")
        print("CUDA is not available here: running on the CPU (pass -dev cpu to silence this).")
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
    threads = torch.get_num_threads()
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    try:
        return run_all(config)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) get their setting back


def image_saver(args, run):
    """The runner's image sink: an algorithm's images of a round saved as a captioned grid every --image_every
    rounds and after the last one."""
    folder = os.path.join(args.results_dir, run_name(args, run) + "_images")

    def save(round_index, images, captions):
        every = args.image_every
        if every and ((round_index + 1) % every == 0 or round_index + 1 == args.global_rounds):
            save_image_grid(os.path.join(folder, f"round_{round_index:04d}.png"), images, captions)
    return save


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
            runner = Runner(config, dataset, run, device, cache, engine=client_pool(args),
                            image_sink=image_saver(args, run))
            try:
                if args.resume:
                    runner.resume()
                histories.append(write_run(config, run, runner, runner.train()))
            finally:
                runner.close()
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc) from None
    return summarize_runs(args, histories)


def client_pool(args):
    """With -pc N > 1: N worker processes (at most one per client), sharing this process's CPU threads."""
    workers = min(args.parallel_clients, args.num_clients)
    if workers == 1:
        return None
    return ClientPool(workers, threads=max(1, torch.get_num_threads() // workers))


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


def main(argv=None):
    try:
        run_experiment(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
