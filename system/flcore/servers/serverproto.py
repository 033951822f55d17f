"""FedProto (Tan et al., AAAI 2022): the server averages the clients' per-class mean features into global
prototypes, weighted by each client's sample count of the class. Also the shared round of every server whose
clients upload per-class mean features (FedGH, FedTGP)."""
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flcore.clients.clientproto import ClientFedProto
from flcore.exchange import Payload
from flcore.per_class import per_class_means
from flcore.servers.serverbase import Server
from flcore.settings import Settings, option, raise_first_failed


@dataclass(frozen=True)
class PrototypeSettings(Settings):
    """The settings every server of per-class mean features extends (FedProto, FedGH, FedTGP); no flags shared."""
    title = "prototype servers"


@dataclass(frozen=True)
class NearestPrototypeSettings(PrototypeSettings):
    """The settings every server whose clients predict by the nearest global prototype extends (FedProto,
    FedTGP)."""
    title = "FedProto and FedTGP"
    proto_eval: str = option("nearest", "--proto_eval", choices=("nearest", "head"),
                             help="how clients predict: the nearest global prototype (the papers) or their own head")


@dataclass(frozen=True)
class FedProtoSettings(NearestPrototypeSettings):
    title = "FedProto"
    # The default is the reference library's example runs (HtFLlib system/examples.sh, -lam 10).
    lamda: float = option(10.0, "-lam", "--lamda", help="FedProto: weight of the prototype regularizer")

    def validate(self):
        raise_first_failed([(self.lamda >= 0, f"-lam must be >= 0, got {self.lamda}")])


class PrototypeServer(Server):
    """Clients upload per-class mean features (means, classes, and with FedProto the counts); the server turns
    them into global knowledge of a new version and replies with it to the clients whose uploads arrived; a
    selected client holding an older version gets it at the start of its round. Subclasses define
    `update_knowledge`, `knowledge` and `metric_names`."""
    Settings = PrototypeSettings
    phases = ("eval", "train", "aggregate")
    metric_names = ()

    def prepare(self):
        self.version = 0
        # The knowledge version each client holds (absent: none).
        self.client_versions = {}

    def update_knowledge(self, means, classes, counts):
        """Update the global knowledge from all arrived rows (counts: None unless the clients upload them); sets
        `self.round_metrics`."""
        raise NotImplementedError

    def knowledge(self):
        """The current global knowledge, as the clients receive it."""
        raise NotImplementedError

    def payload_for(self, client_id):
        if self.version == 0 or self.client_versions.get(client_id) == self.version:
            return None
        self.client_versions[client_id] = self.version
        return self.knowledge()

    def forget(self, client_id):
        self.client_versions.pop(client_id, None)

    def aggregate(self, uploads, timer):
        self.round_metrics = {name: math.nan for name in self.metric_names}
        if not uploads:
            tqdm.write(f"round {self.round}: no uploads arrived; keeping the global knowledge")
            return {}
        means, classes = (torch.cat([u.tensors[name] for u in uploads.values()]).to(self.device)
                          for name in ("means", "classes"))
        counts = None
        if all("counts" in u.tensors for u in uploads.values()):
            counts = torch.cat([u.tensors["counts"] for u in uploads.values()]).to(self.device)
        with timer("aggregate"):
            self.update_knowledge(means, classes, counts)
        self.version += 1
        knowledge = self.knowledge()
        for client_id in uploads:
            self.client_versions[client_id] = self.version
        return dict.fromkeys(uploads, knowledge)

    def state_dict(self):
        return {"version": self.version, "client_versions": dict(self.client_versions)}

    def load_state_dict(self, state):
        self.version = state["version"]
        self.client_versions = dict(state["client_versions"])


class ServerFedProto(PrototypeServer):
    Settings = FedProtoSettings

    def prepare(self):
        super().prepare()
        self.global_prototypes = torch.zeros(self.num_classes, self.context.feature_dim, device=self.device)
        self.present = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        tqdm.write(f"FedProto: lambda {self.settings.lamda}, clients predict by {self.settings.proto_eval}")

    def client_spec(self):
        return Payload(config={"lamda": self.settings.lamda, "proto_eval": self.settings.proto_eval})

    @classmethod
    def new_client(cls, setup, spec):
        return ClientFedProto(setup, lamda=spec.config["lamda"], proto_eval=spec.config["proto_eval"])

    def update_knowledge(self, means, classes, counts):
        """Averages weighted by the clients' sample counts of each class (which FedProto's clients upload with
        their means); a class that no arrived client holds keeps its previous global prototype."""
        averages, totals = per_class_means(means, classes, self.num_classes, weights=counts)
        arrived = totals > 0
        self.global_prototypes = torch.where(arrived[:, None], averages, self.global_prototypes)
        self.present = self.present | arrived

    def knowledge(self):
        """The global prototypes of the classes that have one, and those classes."""
        classes = torch.nonzero(self.present).squeeze(1)
        return Payload({"prototypes": self.global_prototypes[classes], "classes": classes})

    def state_dict(self):
        state = super().state_dict()
        state.update(global_prototypes=self.global_prototypes, present=self.present)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.global_prototypes = state["global_prototypes"].to(self.device)
        self.present = state["present"].to(self.device)
