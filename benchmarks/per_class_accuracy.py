"""Where a run's clients are right and wrong: test accuracy by how often the client saw the class in training, the
share of predictions that fall on classes the client never trained on, and the post-hoc logit adjustment
(logits + tau * log prior of the client's training labels) for several tau, all from a run's last checkpoint.

    python benchmarks/per_class_accuracy.py results/many_classes/TinyImagenet32_Local_local_s0_r60.toml \
        --tau 0 0.5 1 --out local.json

The .toml is the configuration a run writes beside its results; the run must have kept checkpoints (-sfn). Relative
paths in it are read from --cwd (default system/, where the project's scripts start main.py). tau 0 scores the
checkpoint's models as the run did; the script checks that its accuracy equals the last one in the run's .h5 (the
evaluation after the last round, made from the same models).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

from flcore.errors import UserError
from flcore.ktl_ops import log_label_prior
from flcore.runner import Runner
from flutils.data import load_federated_dataset
from flutils.options import parse_args
from flutils.results import read_h5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test samples grouped by how many training samples of their class the client had.
COUNT_BINS = ((0, 0), (1, 4), (5, 19), (20, 49), (50, 10 ** 9))
EVAL_BATCH = 500


def bin_label(low, high):
    if low == high:
        return str(low)
    return f"{low}+" if high >= 10 ** 9 else f"{low}-{high}"


def load_runner(toml, run):
    """Run `run` of the configuration with its clients' states from its last checkpoint; the checkpoint must agree
    with the configuration on every setting both know (a setting added since keeps its default)."""
    config = parse_args(["--config", toml, "-dev", "cpu"])
    runner = Runner(config, load_federated_dataset(config.run), run, torch.device("cpu"))
    path = runner.checkpoint_path()
    if path is None or not os.path.isfile(path):
        raise UserError(f"no checkpoint for run {run} of {toml} (looked for {path}); rerun it with -sfn DIR")
    state = torch.load(path, map_location="cpu", weights_only=True)
    now = runner.fingerprint()
    changed = sorted(key for key in set(state["fingerprint"]) & set(now) if state["fingerprint"][key] != now[key])
    if changed:
        raise UserError(f"{path} was made with other values of {', '.join(changed)} than {toml}")
    runner.engine.load_state_dict(state["clients"])
    return runner, state


@torch.no_grad()
def client_logits(client):
    """The client's test logits as its evaluation scores them (before any --logit_adjust shift)."""
    client.model.eval()
    shift = getattr(client, "prior_shift", None)
    outputs = []
    for start in range(0, len(client.test_y), EVAL_BATCH):
        (x,) = client.to_device(client.test_x[start:start + EVAL_BATCH])
        scores = client.scores(x).float()
        outputs.append((scores if shift is None else scores - shift).cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0, client.num_classes)


def analyse(runner, taus):
    """{tau: {"correct", "samples", "bins": [[correct, samples], ...], "unseen_predictions"}} over all clients."""
    totals = {tau: {"correct": 0, "samples": 0, "bins": [[0, 0] for _ in COUNT_BINS], "unseen_predictions": 0}
              for tau in taus}
    for client in runner.clients:
        with runner.store.loaded(client, modify=False):
            logits = client_logits(client)
            train_counts = torch.bincount(client.train_y.cpu(), minlength=client.num_classes)
            prior = log_label_prior(client.train_y.cpu(), client.num_classes)
            labels = client.test_y.cpu()
        label_counts = train_counts[labels]
        for tau in taus:
            predictions = (logits + tau * prior).argmax(1)
            right = predictions == labels
            total = totals[tau]
            total["correct"] += int(right.sum())
            total["samples"] += len(labels)
            total["unseen_predictions"] += int((train_counts[predictions] == 0).sum())
            for index, (low, high) in enumerate(COUNT_BINS):
                members = (label_counts >= low) & (label_counts <= high)
                total["bins"][index][0] += int(right[members].sum())
                total["bins"][index][1] += int(members.sum())
    return totals


def table(totals):
    header = ("| tau | accuracy (%) | " + " | ".join(f"class seen {bin_label(*b)} times" for b in COUNT_BINS)
              + " | predictions on never-seen classes (%) |")
    lines = [header, "|" + "---|" * (len(COUNT_BINS) + 3)]
    for tau, total in totals.items():
        cells = [f"{100 * c / n:.1f} ({n})" if n else "-" for c, n in total["bins"]]
        lines.append(f"| {tau:g} | {100 * total['correct'] / total['samples']:.2f} | " + " | ".join(cells)
                     + f" | {100 * total['unseen_predictions'] / total['samples']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the .toml a run wrote beside its results")
    parser.add_argument("--run", type=int, default=0, help="which run of -t (%(default)s)")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                        help="logit-adjustment strengths to score (%(default)s)")
    parser.add_argument("--cwd", default=os.path.join(REPO, "system"),
                        help="folder the run was started from (its relative paths) (%(default)s)")
    parser.add_argument("--out", help="also write the numbers to this .json")
    args = parser.parse_args(argv)
    toml = os.path.abspath(args.config)
    out = os.path.abspath(args.out) if args.out else None
    if not os.path.isfile(toml):
        print(f"error: {args.config} does not exist; pass the .toml a run wrote beside its results", file=sys.stderr)
        return 2
    os.chdir(args.cwd)
    torch.set_num_threads(1)
    try:
        runner, state = load_runner(toml, args.run)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        totals = analyse(runner, [0.0] + [tau for tau in args.tau if tau != 0.0])
    finally:
        runner.close()
    h5 = f"{toml[:-len('.toml')]}_{args.run}.h5"
    recorded = float(read_h5(h5)["rs_test_acc"][-1]) if os.path.isfile(h5) else float("nan")
    measured = totals[0.0]["correct"] / totals[0.0]["samples"]
    print(f"{os.path.basename(toml)}, run {args.run}, checkpoint after round {state['round']}: accuracy {measured:.4f} "
          f"({os.path.basename(h5)} recorded {recorded:.4f})")
    print(table(totals))
    if out:
        with open(out, "w", encoding="utf-8") as file:
            json.dump({"config": toml, "run": args.run, "round": state["round"], "recorded_accuracy": recorded,
                       "bins": [bin_label(*b) for b in COUNT_BINS],
                       "by_tau": {str(tau): total for tau, total in totals.items()}}, file, indent=1)
    return 0 if np.isclose(measured, recorded, atol=1e-9) else 1


if __name__ == "__main__":
    sys.exit(main())
