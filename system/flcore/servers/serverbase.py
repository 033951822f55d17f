"""The federated round loop shared by every algorithm, with clients simulated in one process."""
import hashlib
import json
import os
import time
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from flcore.client_store import (
    AVAILABLE_SHARE,
    STATE_MULTIPLE,
    DiskStore,
    MemoryStore,
    available_memory_bytes,
    state_bytes,
)
from flcore.clients.clientbase import Client, ClientSetup
from flcore.load_cache import LoadCache
from flcore.trainmodel import build_family_model
from flutils.errors import UserError
from flutils.results import History, run_name

# Flags that may change between a run and its resumption without changing what the run computes.
RESUME_FREE_FLAGS = {"resume", "times", "prev", "device", "device_id", "results_dir", "save_folder_name",
                     "image_every", "num_threads", "global_rounds", "auto_break", "top_cnt", "goal", "dataset_dir",
                     "client_state", "client_state_dir"}

# Simulated delays (seconds) of slow clients, as the reference sleeps: per batch when training, once when sending.
SLOW_TRAIN_DELAY = 0.1
SLOW_SEND_DELAY = 0.1


def derive_seed(*keys):
    """Independent 63-bit seeds for (base seed, run) and (base seed, run, client)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


class PhaseTimer:
    """Wall-clock seconds per named phase within one round (CUDA work is synchronized before reading)."""

    def __init__(self, names, device):
        self.seconds = {name: 0.0 for name in names}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextmanager
    def __call__(self, name):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start


class Server:
    """One run of an algorithm. A subclass says what its clients are (`new_client`), what the server sends each
    selected client (`send_to`), what it takes from each after training (`collect`) and does with what arrived
    (`server_round`), which state it checkpoints, and which flags it owns (`add_flags`, `check_flags`: read by
    flutils/options.py, so `main.py -h` lists them in the algorithm's group). Clients are touched only inside
    `self.store.loaded(client)`, so their state may wait on disk between turns (flcore/client_store.py)."""
    phases = ("eval", "train")
    # The phase that times `collect` (FedKTL: "prototypes").
    collect_phase = "train"

    def __init__(self, args, dataset, run, device, cache=None):
        self.args = args
        self.dataset = dataset
        self.run = run
        self.device = device
        # Slow-to-load, read-only things (a Stable Diffusion pipeline) shared by the runs of one experiment.
        self.cache = cache if cache is not None else LoadCache()
        self.num_clients = args.num_clients
        self.num_classes = args.num_classes
        self.seed = derive_seed(args.seed, run)
        self.rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        self.history = History()
        self.round = 0
        self.upload_floats = 0
        self.download_floats = 0
        self.round_metrics = {}
        self.prepare()

        slow_train = self.pick_clients(args.train_slow_rate)
        self.send_slow = self.pick_clients(args.send_slow_rate)
        self.clients = []
        self.store = self.open_store() if args.client_state == "disk" else MemoryStore()
        state_sizes = []
        for i in range(self.num_clients):
            client_seed = derive_seed(args.seed, run, i)
            torch.manual_seed(client_seed)
            channels, height, _ = dataset.image_shape
            model = build_family_model(args.model_family, i, args.num_classes, args.feature_dim, channels, height)
            setup = ClientSetup(
                client_id=i, model=model, data=dataset.clients[i], seed=client_seed, device=device,
                num_classes=args.num_classes, batch_size=args.batch_size, local_epochs=args.local_epochs,
                learning_rate=args.local_learning_rate, train_slow=i in slow_train,
                learning_rate_decay=args.learning_rate_decay_gamma if args.learning_rate_decay else None)
            client = self.new_client(setup)
            state_sizes.append(state_bytes(client))
            self.clients.append(client)
            self.store.add(client)
            if args.client_state == "auto" and self.store.kind == "memory" and not self.fits_in_memory(state_sizes):
                self.store = self.open_store()
                for built in self.clients:
                    self.store.add(built)
        torch.manual_seed(self.seed)
        if args.client_state == "auto":
            where = "memory" if self.store.kind == "memory" else f"disk ({self.store.folder})"
            available = available_memory_bytes()
            tqdm.write(f"client state: {where}; estimated {self.estimated_state_bytes(state_sizes) / 2**30:.1f} GiB "
                       f"resident for {self.num_clients} clients, "
                       f"{available / 2**30 if available else float('nan'):.1f} GiB available (--client_state chooses)")

    def estimated_state_bytes(self, state_sizes):
        """Resident memory of all clients in memory, extrapolated from the clients built so far."""
        return STATE_MULTIPLE * sum(state_sizes) * self.num_clients / len(state_sizes)

    def fits_in_memory(self, state_sizes):
        available = available_memory_bytes()
        return available is None or self.estimated_state_bytes(state_sizes) <= AVAILABLE_SHARE * available

    def open_store(self):
        """A disk store in this run's folder under --client_state_dir (default: client_state/ beside the
        checkpoints, else beside the results)."""
        args = self.args
        root = args.client_state_dir or os.path.join(args.save_folder_name or args.results_dir, "client_state")
        run_key = hashlib.sha256(json.dumps([self.fingerprint(), self.run], sort_keys=True, default=str)
                                 .encode()).hexdigest()[:16]
        return DiskStore(os.path.join(root, run_name(args, self.run)), run_key,
                         keep_for_checkpoints=bool(args.save_folder_name))

    @classmethod
    def add_flags(cls, parser):
        """Declares the flags this class owns (not its parents'), in argument groups of `parser`."""

    @classmethod
    def check_flags(cls, args):
        """Raises UserError for a bad value of a flag this class owns (not its parents'); runs at parse time."""

    def prepare(self):
        """Algorithm-specific set-up that the clients depend on; runs before they are built."""

    def new_client(self, setup):
        """The client of this algorithm built from `setup` (plus what the algorithm gives it)."""
        return Client(setup)

    def pick_clients(self, rate):
        return set(self.rng.choice(self.num_clients, int(rate * self.num_clients), replace=False).tolist())

    def select_clients(self):
        count = max(1, int(self.args.join_ratio * self.num_clients))
        if self.args.random_join_ratio:
            count = int(self.rng.integers(count, self.num_clients + 1))
        return [self.clients[i] for i in self.rng.choice(self.num_clients, count, replace=False)]

    def arrived_uploads(self, trained, train_seconds):
        """The trained clients whose uploads reach the server: drops, then (with -ts) the time threshold."""
        arrived = trained
        if self.args.client_drop_rate > 0:
            keep = max(1, int((1 - self.args.client_drop_rate) * len(trained)))
            arrived = [trained[i] for i in sorted(self.rng.choice(len(trained), keep, replace=False))]
        if self.args.time_select:
            kept = []
            for client in arrived:
                cost = train_seconds[client.id]
                if client.train_slow:
                    cost += SLOW_TRAIN_DELAY * float(self.rng.random(client.batches_last_round).sum())
                if client.id in self.send_slow:
                    cost += SLOW_SEND_DELAY * float(self.rng.random())
                if cost <= self.args.time_threshold:
                    kept.append(client)
            arrived = kept
        return arrived

    def evaluate(self, stats):
        """Records the round's evaluation from each client's (correct, samples, AUC, last train loss)."""
        correct = np.array([s[0] for s in stats], dtype=np.float64)
        counts = np.array([s[1] for s in stats], dtype=np.float64)
        aucs = np.array([s[2] for s in stats], dtype=np.float64)
        has_test = counts > 0
        acc = correct.sum() / counts.sum()
        auc = float(np.sum(aucs[has_test] * counts[has_test]) / counts.sum())
        per_client_acc = correct[has_test] / counts[has_test]
        losses = [s[3] for s in stats if not np.isnan(s[3])]
        train_loss = float(np.mean(losses)) if losses else float("nan")
        self.history.record_eval(self.round, float(acc), auc, float(per_client_acc.std()),
                                 float(aucs[has_test].std()), train_loss)
        tqdm.write(f"round {self.round:4d} | test acc {acc:.4f} | test auc {auc:.4f} | "
                   f"acc std {per_client_acc.std():.4f} | train loss {train_loss:.4f}")

    def prepare_round(self, selected):
        """What the server computes once per round before sending (no client is touched here)."""

    def send_to(self, client):
        """What the server sends one selected client before its evaluation and training; `Local` sends nothing."""

    def collect(self, client):
        """What the server takes from a client after its training (its upload); `Local` takes nothing."""
        return None

    def server_round(self, uploads, timer):
        """What the server does with the uploads that arrived ({client id: collect's value}, in arrival order);
        `Local` has nothing to do."""

    def send(self, selected):
        """The round's sending to `selected`, outside the round loop (tools, tests)."""
        self.prepare_round(selected)
        for client in selected:
            with self.store.loaded(client):
                self.send_to(client)

    def exchange(self, arrived, timer):
        """Collects the uploads of `arrived` and runs the server's round on them, outside the round loop."""
        uploads = {}
        for client in arrived:
            with self.store.loaded(client):
                uploads[client.id] = self.collect(client)
        self.server_round(uploads, timer)

    def train(self):
        """Run the remaining rounds; returns the history. As in the reference library, round r selects clients
        and sends them the server's knowledge, then evaluates (every -eg rounds) before training, so round 0
        measures the untrained models; one more evaluation follows the last round. The checkpoint after round r
        is the state before round r + 1, so a resumed run, or one extended with a larger -gr, continues exactly
        as an uninterrupted one."""
        rounds = tqdm(range(self.round, self.args.global_rounds + 1), desc=f"run {self.run}", unit="round",
                      initial=self.round, total=self.args.global_rounds + 1)
        for r in rounds:
            self.round = r
            timer = PhaseTimer(self.phases, self.device)
            start = time.perf_counter()
            self.upload_floats = self.download_floats = 0
            self.round_metrics = {}
            selected = self.select_clients()
            self.prepare_round(selected)
            last = r == self.args.global_rounds
            evaluating = r % self.args.eval_gap == 0 or last
            # Training may share a client's turn with its evaluation unless the evaluation can end the run.
            train_in_turn = not (last or self.args.auto_break)
            chosen = {client.id for client in selected}
            stats, train_seconds, uploads = {}, {}, {}
            # Each client's turn: what the server sends, its evaluation (before any training, as in the reference
            # library), then its training. A turn touches only the client's own state and no shared random
            # stream but training's, so one client at a time in the selection order gives the same results as
            # sending to all, evaluating all, then training all.
            others = [client for client in self.clients if client.id not in chosen] if evaluating else []
            for client in tqdm(selected + others, desc="clients", unit="client", leave=False):
                with self.store.loaded(client, modify=client.id in chosen):
                    if client.id in chosen:
                        self.send_to(client)
                    if evaluating:
                        with timer("eval"):
                            stats[client.id] = (*client.test_metrics(), client.last_train_loss)
                    if train_in_turn and client.id in chosen:
                        self.train_client(client, timer, train_seconds, uploads)
            if evaluating:
                self.evaluate([stats[client.id] for client in self.clients])
                if last or (self.args.auto_break and self.history.evaluations_since_best() >= self.args.top_cnt):
                    break
            if not train_in_turn:
                for client in selected:
                    with self.store.loaded(client):
                        self.train_client(client, timer, train_seconds, uploads)
            trained = [self.clients[i] for i in train_seconds]
            arrived = self.arrived_uploads(trained, train_seconds)
            self.server_round({client.id: uploads[client.id] for client in arrived}, timer)
            self.history.record_round(time.perf_counter() - start, timer.seconds,
                                      self.upload_floats, self.download_floats, self.round_metrics)
            self.round = r + 1
            self.save_checkpoint()
        best_acc, best_round = self.history.best()
        times = self.history.values["round_time"]
        tqdm.write(f"run {self.run}: best test accuracy {best_acc:.4f} at round {best_round}; "
                   f"{np.mean(times) if times else float('nan'):.2f} s per round")
        self.store.close()
        return self.history

    def train_client(self, client, timer, train_seconds, uploads):
        """One selected client's local training and upload, recorded by client id."""
        with timer("train"):
            start = time.perf_counter()
            client.train()
            train_seconds[client.id] = time.perf_counter() - start
        with timer(self.collect_phase):
            uploads[client.id] = self.collect(client)

    def extra_state(self):
        """Algorithm-specific server state to checkpoint."""
        return {}

    def load_extra_state(self, state):
        pass

    def checkpoint_path(self):
        if not self.args.save_folder_name:
            return None
        return os.path.join(self.args.save_folder_name, run_name(self.args, self.run) + ".pt")

    def fingerprint(self):
        return {k: v for k, v in sorted(vars(self.args).items()) if k not in RESUME_FREE_FLAGS}

    def state_dict(self):
        return {
            "fingerprint": self.fingerprint(),
            "round": self.round,
            "history": self.history.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "clients": self.store.checkpoint_state(self.clients),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state):
        if state["fingerprint"] != self.fingerprint():
            changed = sorted(k for k in set(state["fingerprint"]) | set(self.fingerprint())
                             if state["fingerprint"].get(k) != self.fingerprint().get(k))
            raise UserError(f"the checkpoint was made with other values of {', '.join(changed)}; "
                            f"rerun with the same flags or drop --resume")
        self.round = state["round"]
        self.history.load_state_dict(state["history"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        clients = state["clients"]
        if isinstance(clients, list):  # a checkpoint written before the client-state stores: the states themselves
            clients = {"store": MemoryStore.kind, "states": clients}
        self.store.restore(self.clients, clients)
        self.load_extra_state(state["extra"])

    def save_checkpoint(self):
        """Written to a temporary file and renamed, so a kill during the write keeps the previous checkpoint."""
        path = self.checkpoint_path()
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        self.store.checkpoint_written()

    def resume(self):
        """Load this run's checkpoint; returns False when there is none (the run starts from round 0)."""
        path = self.checkpoint_path()
        if path is None or not os.path.isfile(path):
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"cannot read checkpoint {path} ({type(exc).__name__}); delete it to start over") from None
        self.load_state_dict(state)
        tqdm.write(f"run {self.run}: resumed from {path} at round {self.round}")
        return True
