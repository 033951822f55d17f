"""Peak resident memory and seconds per round with the client state in memory or on disk (--client_state).

    python benchmarks/client_state.py --dataset_dir DIR --data NAME --clients N [--algos A ...] [--stores S ...]
        [--family HtFE8] [--rounds 1]

Each configuration runs in a child process of its own (so its peak memory is its own), one CPU thread each;
a memory-store run whose estimated client state exceeds the available memory is skipped rather than run into
the kernel's OOM killer. Prints one markdown row per configuration: seconds per trained round, the other seconds
(loading data, building the clients and the generator, the final evaluation), and peak resident memory.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

ROW = "| {clients} | {algo} | {store} | {round} | {other} | {peak} |"


def child(argv):
    """Runs one experiment in this process; prints its timings and peak memory as one JSON line."""
    from flutils import experiment
    from flutils.options import parse_args

    start = time.perf_counter()
    config = parse_args(argv)
    summary = experiment.run_experiment(config)
    total = time.perf_counter() - start
    rounds = summary["seconds_per_round"] * config.run.global_rounds
    print(json.dumps({"seconds_per_round": summary["seconds_per_round"], "other_seconds": total - rounds,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def estimated_state_gib(family, clients, feature_dim, image_shape):
    """The memory store's estimate (client_store.STATE_MULTIPLE x parameters and buffers) for the family."""
    import torch

    from flcore.client_store import STATE_MULTIPLE
    from flcore.trainmodel import build_family_model, family_models

    members = family_models(family)
    channels, height = image_shape
    sizes = []
    for i in range(len(members)):
        with torch.device("meta"):
            model = build_family_model(family, i, 10, feature_dim, channels, height)
        sizes.append(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
    return STATE_MULTIPLE * sum(sizes[i % len(sizes)] for i in range(clients)) / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--data", required=True, help="dataset folder name under --dataset_dir")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--algos", nargs="+", default=["FedKTL-stylegan-3", "Local"])
    parser.add_argument("--stores", nargs="+", default=["memory", "disk"], choices=["memory", "disk"])
    parser.add_argument("--family", default="HtFE8")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--results_dir", default="/tmp/client_state_benchmark")
    args = parser.parse_args()

    from flcore.client_store import available_memory_bytes

    available = available_memory_bytes() / 2**30
    estimate = estimated_state_gib(args.family, args.clients, 512, (3, 32))
    print(f"{args.clients} clients of {args.family}: memory store estimated {estimate:.1f} GiB, {available:.1f} GiB "
          f"available; {args.rounds} round(s), one CPU thread per run")
    print("| clients | algorithm | client state | s per round | other s | peak RSS MiB |\n|---|---|---|---|---|---|")
    for algo in args.algos:
        for store in args.stores:
            cells = {"clients": args.clients, "algo": algo, "store": store}
            if store == "memory" and estimate > available:
                print(ROW.format(**cells, round="skipped: does not fit", other="-", peak="-"), flush=True)
                continue
            argv = ["-data", args.data, "--dataset_dir", args.dataset_dir, "-nb", "10", "-nc", str(args.clients),
                    "-m", args.family, "-algo", algo, "-gr", str(args.rounds), "-dev", "cpu", "--num_threads", "1",
                    "--image_every", "0", "--client_state", store, "--results_dir", args.results_dir,
                    "-go", f"bench_{store}"]
            result = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
            if result.returncode != 0:
                reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
                print(ROW.format(**cells, round=f"failed: {reason}", other="-", peak="-"), flush=True)
                continue
            numbers = json.loads(result.stdout.strip().splitlines()[-1])
            print(ROW.format(**cells, round=f"{numbers['seconds_per_round']:.1f}",
                             other=f"{numbers['other_seconds']:.0f}", peak=f"{numbers['peak_rss_mib']:,.0f}"),
                  flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
