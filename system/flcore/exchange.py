"""The one exchange contract between a server and its clients, whichever engine carries it (flcore/runner.py:
this process; flcore/parallel.py: -pc workers; system/flower/: Flower nodes). A client takes turns: it receives
the server's payloads, is evaluated, trains, and uploads one payload; the server builds what it sends from its own
state only and aggregates the uploads that arrived. Upload and download sizes are counted from the payloads themselves."""
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch


def derive_seed(*keys):
    """Independent 63-bit seeds for (base seed, run), (base seed, run, client) and (client seed, round)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


@dataclass
class Payload:
    """What travels one way between server and client.

    tensors: named tensors; the floating-point ones are what the per-round upload and download floats count
        (integer and bool tensors are class ids and masks: indexing, not knowledge).
    config: settings and small values (numbers, strings, booleans), not counted.
    metrics: measurements a client reports for the server's round metrics (numbers or lists of numbers), not
        counted."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, bool | int | float | str] = field(default_factory=dict)
    metrics: dict[str, float | list[float]] = field(default_factory=dict)

    def floats(self):
        return sum(t.numel() for t in self.tensors.values() if t.is_floating_point())

    def to_dict(self):
        return {"tensors": self.tensors, "config": self.config, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, state):
        return cls(dict(state["tensors"]), dict(state["config"]), dict(state["metrics"]))


def flatten(tree, prefix):
    """{name: {part: tensor}} -> {"prefix/name/part": tensor}, for nested tensors in a payload."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}/{key}"))
        else:
            flat[f"{prefix}/{key}"] = value
    return flat


def unflatten(tensors, prefix):
    """The inverse of `flatten` for the keys under `prefix` (None when there are none)."""
    tree = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + "/"):
            continue
        *path, last = key[len(prefix) + 1:].split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return tree or None


@dataclass
class TurnRequest:
    """One client's turn in a round: the payloads to receive (in order), then whether to evaluate and to train."""
    round: int
    payloads: list[Payload]
    evaluate: bool
    train: bool


@dataclass
class TurnReply:
    """stats: (correct, test samples, AUC, test loss, last training loss) when evaluated; upload: after training;
    seconds: per phase of the turn; train_seconds: of training alone; batches: training steps taken (for the simulated delays of slow clients)."""
    stats: tuple | None = None
    upload: Payload | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    batches: int = 0


class PhaseTimer:
    """Wall-clock seconds per named phase (of a round, or of a client's turn); CUDA work is synchronized before the
    clock is read. `names` start at 0; others are added when first timed."""

    def __init__(self, names, device):
        self.seconds = {name: 0.0 for name in names}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def add(self, seconds):
        """Seconds per phase measured elsewhere (a client's turn)."""
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value

    @contextmanager
    def __call__(self, name):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def take_turn(client, request, upload_phase="train"):
    """Runs one turn on `client` (a flcore client, resident); the same function for every engine. Training draws
    the global random stream (dropout) from a seed of its own client and round, so a client trains the same
    whichever clients trained before it, in this process or another."""
    reply = TurnReply()
    timer = PhaseTimer((), client.device)
    for payload in request.payloads:
        client.receive(payload)
    if request.evaluate:
        with timer("eval"):
            reply.stats = (*client.test_metrics(), client.last_train_loss)
    if request.train:
        devices = []
        if client.device.type == "cuda":
            devices = [client.device.index if client.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices), timer("train"):
            torch.manual_seed(derive_seed(client.seed, request.round))
            client.train()
        reply.train_seconds = timer.seconds["train"]
        reply.batches = client.batches_last_round
        with timer(upload_phase):
            reply.upload = client.upload()
    reply.seconds = timer.seconds
    return reply
