"""Seconds per round split by phase and by client model, and peak memory, for one main.py configuration.

    python benchmarks/round_costs.py [main.py flags...]

With no flags it measures the default offline run. Prints the machine, the threads and the device, then markdown
tables: per phase (seconds per round and share of the round), per client model (seconds per turn of each phase;
peak CUDA memory per turn when the clients run in this process on CUDA), and peak memory of this process and of
the -pc workers. With -pc N the client phases are summed over the clients that ran at the same time, so they can
add up to more than the round's wall-clock time.
"""
import os
import platform
import resource
import sys
import time
from collections import defaultdict

import numpy as np
import torch

import flcore.runner as runner
from flcore.errors import UserError
from flcore.parallel import ClientPool
from flcore.runner import LocalClients, run_name
from flcore.trainmodel import family_models
from flutils import experiment
from flutils.options import parse_args
from flutils.results import read_h5

PHASES = ("train", "prototypes", "eval", "align", "generate")


class TurnRecorder:
    """Each turn's seconds per phase by client, read from the replies of whichever engine ran it; with the clients
    in this process on CUDA, each turn's peak CUDA memory too (the peak counter is reset per turn, so the run's
    overall peak is kept aside first)."""

    def __init__(self):
        self.seconds = defaultdict(lambda: defaultdict(list))  # client id -> phase -> [seconds per turn]
        self.peak_cuda = defaultdict(int)  # client id -> bytes
        self.run_peak_cuda = 0

    def wrap_engines(self):
        for owner in (LocalClients, ClientPool):
            run_turns = owner.run_turns

            def recorded(engine, requests, run_turns=run_turns):
                replies = run_turns(engine, requests)
                for client_id, reply in replies.items():
                    for phase, seconds in reply.seconds.items():
                        self.seconds[client_id][phase].append(seconds)
                return replies
            owner.run_turns = recorded
        take_turn = runner.take_turn

        def measured_turn(client, request, upload_phase="train"):
            if client.device.type != "cuda":
                return take_turn(client, request, upload_phase)
            self.run_peak_cuda = max(self.run_peak_cuda, torch.cuda.max_memory_allocated(client.device))
            torch.cuda.reset_peak_memory_stats(client.device)
            reply = take_turn(client, request, upload_phase)
            peak = torch.cuda.max_memory_allocated(client.device)
            self.peak_cuda[client.id] = max(self.peak_cuda[client.id], peak)
            self.run_peak_cuda = max(self.run_peak_cuda, peak)
            return reply
        runner.take_turn = measured_turn


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(args):
    threads = args.num_threads or torch.get_num_threads()
    workers = min(args.parallel_clients, args.num_clients)
    split = (f"{workers} client workers x {max(1, threads // workers)} thread(s), server {threads}"
             if workers > 1 else f"{threads} thread(s), clients one at a time")
    device = experiment.resolve_device(args)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"machine: {platform.node()}, {cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
            f"{split}; device {device}{gpu}")


def measure(argv):
    config = parse_args(argv)
    args = config.run
    recorder = TurnRecorder()
    recorder.wrap_engines()
    start = time.perf_counter()
    experiment.run_experiment(config)
    total = time.perf_counter() - start
    data = read_h5(os.path.join(args.results_dir, run_name(args, args.prev) + ".h5"))
    round_seconds = float(np.mean(data["round_time"]))
    rows = {phase: float(np.mean(data[f"time_{phase}"])) for phase in PHASES if f"time_{phase}" in data}
    rows["whole round"] = round_seconds
    memory = {"peak RSS, this process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if min(args.parallel_clients, args.num_clients) > 1:
        memory["peak RSS, largest -pc worker"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if torch.cuda.is_available():
        memory["peak CUDA, this process"] = max(recorder.run_peak_cuda, torch.cuda.max_memory_allocated()) / 2**20
    other = total - float(np.sum(data["round_time"]))
    return args, rows, memory, recorder, data, other


def per_model_rows(args, recorder):
    """{model name: (clients, {phase: mean seconds per turn}, peak CUDA MiB)}."""
    names = family_models(args.model_family)
    grouped = defaultdict(lambda: (set(), defaultdict(list), [0]))
    for client_id, phases in recorder.seconds.items():
        clients, seconds, peak = grouped[names[client_id % len(names)]]
        clients.add(client_id)
        for phase, values in phases.items():
            seconds[phase].extend(values)
        peak[0] = max(peak[0], recorder.peak_cuda.get(client_id, 0))
    return {name: (len(clients), {phase: float(np.mean(v)) for phase, v in seconds.items()}, peak[0] / 2**20)
            for name, (clients, seconds, peak) in grouped.items()}


def main_cli(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, rows, memory, recorder, data, other = measure(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nconfiguration: {' '.join(argv) or '(defaults)'}; {len(data['round_time'])} rounds")
    print(machine_line(args))
    print("\n| phase | seconds per round | share of the round |\n|---|---|---|")
    for phase, seconds in rows.items():
        print(f"| {phase} | {seconds:.3f} | {seconds / rows['whole round'] * 100:.0f} % |")
    print(f"| outside the rounds (data, clients, workers, generator, final evaluation) | {other:.1f} s in all | |")
    by_round = ", ".join(f"{seconds:.2f}" for seconds in data["time_train"])
    compiled = "; compilation (--compile) is round 0's excess over the later rounds" if args.compile else ""
    print(f"\ntrain seconds by round: {by_round}{compiled}")
    models = per_model_rows(args, recorder)
    phases = [phase for phase in PHASES if any(phase in seconds for _, seconds, _ in models.values())]
    print(f"\n| client model | clients | {' | '.join(f'{p} s per turn' for p in phases)} | peak CUDA per turn |")
    print("|---" * (len(phases) + 3) + "|")
    for name, (count, seconds, peak) in models.items():
        cells = " | ".join(f"{seconds[p]:.3f}" if p in seconds else "-" for p in phases)
        print(f"| {name} | {count} | {cells} | {f'{peak:.0f} MiB' if peak else 'n/a'} |")
    print("\n| memory | MiB |\n|---|---|")
    for name, mib in memory.items():
        print(f"| {name} | {mib:.0f} |")
    print(f"\nbest test accuracy {data['attrs']['best_acc']:.4f}; "
          f"upload {np.mean(data['upload_floats']):.0f} floats/round, "
          f"download {np.mean(data['download_floats']):.0f} floats/round")
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
