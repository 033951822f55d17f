"""The base of every algorithm's server: what it sends each client, how it aggregates what comes back, and its
state for a checkpoint. The runner (flcore/runner.py) owns everything else: rounds, client selection, drops and
stragglers, the evaluation schedule, communication accounting, checkpoint and resume, results."""
from dataclasses import dataclass

import torch

from flcore.clients.clientbase import Client
from flcore.errors import UserError
from flcore.exchange import Payload
from flcore.fedavg import single_model_name
from flcore.load_cache import LoadCache
from flcore.settings import Settings
from flcore.trainmodel import family_heads


@dataclass(frozen=True)
class RunContext:
    """What an algorithm knows of the run it serves; the runner builds it from its settings and the dataset."""
    run: int
    seed: int  # the run's seed (derived from --seed and the run index)
    device: torch.device
    num_clients: int
    num_classes: int
    feature_dim: int
    model_family: str
    image_shape: tuple  # (channels, height, width) of the clients' images
    global_rounds: int
    batch_size: int  # the clients' local batch size (-lbs)
    learning_rate: float  # the clients' local learning rate (-lr)
    class_names: tuple | None = None  # from the dataset's config.json, when it has them
    dataset_folder: str = ""
    cache: LoadCache | None = None  # slow-to-load read-only things (a pipeline) shared by an experiment's runs
    reference_model: object = None  # reference_model(client_id): a fresh copy of that client's initial model


class Server:
    """An algorithm's server. A subclass declares its flags (`Settings`, a frozen dataclass of flcore/settings.py),
    how its clients are built (`client_spec`, `new_client`), what it sends a selected client (`payload_for`), what it
    does with the uploads that arrived (`aggregate`; its replies reach each client at its next turn), and its state
    (`state_dict`, `load_state_dict`). It never touches a client: everything travels as payloads
    (flcore/exchange.py), so the same class runs with clients in this process, in -pc workers or on Flower nodes."""
    Settings = Settings
    phases = ("eval", "train")
    # The phase that times a client's upload (FedKTL: "prototypes").
    upload_phase = "train"
    # What the algorithm needs of the clients' models, which check_models enforces. shared_model: one architecture
    # for all clients (models averaged: FedFTG, FGL). shared_head: None, any heads; "same", one head architecture
    # for all (heads averaged: LG-FedAvg, FedGen); "linear", a Linear(feature_dim, K) head everywhere (replaced by
    # the server's: FedGH).
    shared_model = False
    shared_head = None

    def __init__(self, settings, context: RunContext):
        self.settings = settings
        self.context = context
        self.run = context.run
        self.seed = context.seed
        self.device = context.device
        self.num_clients = context.num_clients
        self.num_classes = context.num_classes
        self.cache = context.cache if context.cache is not None else LoadCache()
        # Set by the runner: the round being served.
        self.round = 0
        # Set by `aggregate`: the round's measurements (stored by name in the results).
        self.round_metrics = {}
        # Set by algorithms that make images: (images [K, C, H, W] in the clients' normalization, captions), which
        # the runner saves and logs.
        self.round_images = None
        self.prepare()

    @classmethod
    def check_models(cls, run):
        """Raises UserError when the run's family (-m) is not what `shared_model` and `shared_head` need; runs at
        parse time, before check_run."""
        if cls.shared_model:
            single_model_name(run.model_family, run.algorithm)
        if cls.shared_head is None:
            return
        try:
            heads = family_heads(run.model_family)
        except ValueError as exc:
            raise UserError(f"-m: {exc}") from None
        wanted = {"same": {heads[0]}, "linear": {"linear"}}[cls.shared_head]
        if set(heads) != wanted:
            need = "one head architecture for all clients" if cls.shared_head == "same" else "linear heads"
            raise UserError(f"-algo {run.algorithm} needs {need}, but -m {run.model_family} has heads "
                            f"{', '.join(dict.fromkeys(heads))}; use a family with linear heads (e.g. -m HtFE8)")

    @classmethod
    def check_run(cls, settings, run):
        """Raises UserError when this algorithm cannot serve the run's settings (beyond what check_models checks);
        runs at parse time."""

    def prepare(self):
        """Algorithm-specific set-up that the clients depend on; runs before they are built."""

    def client_spec(self):
        """What every client of this run is built from besides its ClientSetup (shared initial weights, settings
        the server resolved): a Payload, so a Flower node builds the same client as this process. Not counted."""
        return Payload()

    @classmethod
    def new_client(cls, setup, spec):
        """The client of this algorithm built from `setup` and the server's `client_spec()`; raises UserError when
        the client's model cannot take part (the message names the client and the fix)."""
        return Client(setup)

    def prepare_round(self, selected):
        """What the server computes once per round, from the selected ids, before sending."""

    def payload_for(self, client_id):
        """What the server sends a selected client before its evaluation and training (None: nothing; `Local`)."""
        return None

    def aggregate(self, uploads, timer):
        """What the server does with the uploads that arrived ({client id: Payload}, in arrival order); returns
        the replies to send ({client id: Payload}; delivered with each client's next turn, counted now)."""
        return {}

    def forget(self, client_id):
        """A client's turn failed (a Flower node down): whatever the server believed it holds may be lost, so the
        next payload to it must not build on it."""

    def state_dict(self):
        """The algorithm's server state to checkpoint."""
        return {}

    def load_state_dict(self, state):
        pass
