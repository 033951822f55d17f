"""A run's results in memory: one entry per evaluation and one per trained round; the runner records them,
the harness (flutils/results.py) writes them."""
import math

import numpy as np

EVAL_KEYS = ("rs_test_acc", "rs_test_auc", "rs_test_acc_std", "rs_test_auc_std", "rs_train_loss", "eval_rounds")
ROUND_KEYS = ("round_time", "upload_floats", "download_floats")


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
