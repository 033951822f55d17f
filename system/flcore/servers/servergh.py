"""FedGH (Yi et al., ACM MM 2023): the server trains one global head, Linear(feature_dim, K), with cross-entropy
on the clients' per-class mean features and sends it back; clients replace their heads by it."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flcore.clients.clientgh import ClientFedGH
from flcore.exchange import Payload, flatten
from flcore.server_training import train_on_rows
from flcore.servers.serverproto import PrototypeServer, PrototypeSettings
from flcore.settings import option, raise_first_failed


@dataclass(frozen=True)
class FedGHSettings(PrototypeSettings):
    title = "FedGH"
    description = "trains the global head on the uploaded means in batches of -lbs"
    server_epochs: int = option(100, "-se", "--server_epochs", help="FedGH: server training epochs per round")
    # The default is the reference library's server_learning_rate default (HtFLlib system/main.py).
    server_learning_rate: float = option(0.01, "-slr", "--server_learning_rate",
                                         help="FedGH: learning rate of the server's training")

    def validate(self):
        raise_first_failed([
            (self.server_epochs >= 1, f"-se must be >= 1, got {self.server_epochs}"),
            (self.server_learning_rate > 0, f"-slr must be > 0, got {self.server_learning_rate}"),
        ])


class ServerFedGH(PrototypeServer):
    Settings = FedGHSettings
    shared_head = "linear"  # the clients' heads are replaced by the server's Linear(feature_dim, K)
    metric_names = ("server_loss",)

    def prepare(self):
        super().prepare()
        self.head = nn.Linear(self.context.feature_dim, self.num_classes).to(self.device)
        self.shuffle_rng = torch.Generator().manual_seed(self.seed)
        tqdm.write(f"FedGH: server lr {self.settings.server_learning_rate}, "
                   f"server epochs {self.settings.server_epochs}")

    @classmethod
    def new_client(cls, setup, spec):
        return ClientFedGH(setup)

    def update_knowledge(self, means, classes, counts):
        def loss(index):
            return F.cross_entropy(self.head(means[index]), classes[index])

        self.round_metrics = {"server_loss": train_on_rows(
            loss, self.head.parameters(), len(classes), self.settings.server_epochs, self.context.batch_size,
            self.settings.server_learning_rate, self.shuffle_rng)}

    def knowledge(self):
        """The global head's weights."""
        return Payload(flatten({k: v.detach().clone() for k, v in self.head.state_dict().items()}, "head"))

    def state_dict(self):
        state = super().state_dict()
        state.update(head=self.head.state_dict(), shuffle_rng=self.shuffle_rng.get_state())
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.head.load_state_dict(state["head"])
        self.shuffle_rng.set_state(state["shuffle_rng"])
