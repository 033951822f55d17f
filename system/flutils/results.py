"""Per-run history in memory, written once at the end as .h5 (reference names), plus summaries and plots."""
import json
import math
import os

import h5py
import numpy as np

EVAL_KEYS = ("rs_test_acc", "rs_test_auc", "rs_test_acc_std", "rs_test_auc_std", "rs_train_loss", "eval_rounds")
ROUND_KEYS = ("round_time", "upload_floats", "download_floats")


def run_name(args, run):
    return f"{args.dataset}_{args.algorithm}_{args.goal}_{run}"


def experiment_name(args):
    return f"{args.dataset}_{args.algorithm}_{args.goal}"


class History:
    """Evaluation metrics (one entry per evaluation) and per-round costs (one entry per trained round)."""

    def __init__(self):
        self.values = {key: [] for key in EVAL_KEYS + ROUND_KEYS}
        self.phase_times = {}

    def record_eval(self, round_index, acc, auc, acc_std, auc_std, train_loss):
        for key, value in zip(EVAL_KEYS, (acc, auc, acc_std, auc_std, train_loss, round_index)):
            self.values[key].append(value)

    def record_round(self, seconds, phases, upload, download, metrics):
        """`metrics`: algorithm-specific per-round values (e.g. FedKTL's alignment losses), stored by name."""
        for name, value in metrics.items():
            self.values.setdefault(name, []).append(value)
        self.values["round_time"].append(seconds)
        self.values["upload_floats"].append(upload)
        self.values["download_floats"].append(download)
        for name, value in phases.items():
            self.phase_times.setdefault(name, []).append(value)

    @property
    def accuracies(self):
        return self.values["rs_test_acc"]

    def best(self):
        """(best accuracy, round it was reached) over the evaluations so far."""
        acc = self.accuracies
        if not acc:
            return float("nan"), -1
        i = self.best_index()
        return acc[i], self.values["eval_rounds"][i]

    def best_index(self):
        """The evaluation with the best accuracy (the first one while all are nan: no evaluation arrived)."""
        acc = self.accuracies
        return int(np.nanargmax(acc)) if not all(math.isnan(a) for a in acc) else 0

    def evaluations_since_best(self):
        return len(self.accuracies) - 1 - self.best_index() if self.accuracies else 0

    def state_dict(self):
        return {"values": {k: list(v) for k, v in self.values.items()},
                "phase_times": {k: list(v) for k, v in self.phase_times.items()}}

    def load_state_dict(self, state):
        self.values = {k: list(v) for k, v in state["values"].items()}
        self.phase_times = {k: list(v) for k, v in state["phase_times"].items()}

    def write_h5(self, path, attrs):
        """Atomic: a reader never sees a half-written file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with h5py.File(tmp, "w") as f:
            for key, series in self.values.items():
                f.create_dataset(key, data=np.asarray(series, dtype=np.float64))
            for name, series in self.phase_times.items():
                f.create_dataset(f"time_{name}", data=np.asarray(series, dtype=np.float64))
            best_acc, best_round = self.best()
            f.attrs["best_acc"] = best_acc
            f.attrs["best_round"] = best_round
            for key, value in attrs.items():
                f.attrs[key] = value
        os.replace(tmp, path)


def read_h5(path):
    with h5py.File(path, "r") as f:
        data = {key: np.asarray(f[key]) for key in f.keys()}
        data["attrs"] = dict(f.attrs)
    return data


def summarize(histories):
    """Mean and std over runs of each run's best accuracy, and the mean seconds per round."""
    best = np.array([h.best()[0] for h in histories], dtype=np.float64)
    round_times = [t for h in histories for t in h.values["round_time"]]
    return {
        "runs": len(histories),
        "best_acc_mean": float(np.mean(best)),
        "best_acc_std": float(np.std(best)),
        "best_acc_per_run": best.tolist(),
        "seconds_per_round": float(np.mean(round_times)) if round_times else float("nan"),
    }


def write_summary(path, summary):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, path)


def plot_accuracy(path, histories, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, history in enumerate(histories):
        ax.plot(history.values["eval_rounds"], np.asarray(history.accuracies) * 100, marker=".", label=f"run {run}")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
