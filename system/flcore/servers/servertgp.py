"""FedTGP (Zhang et al., AAAI 2024): trainable global prototypes. A small network maps each class id to its
global prototype (embedding -> Linear -> ReLU -> Linear); the server trains it on the clients' prototypes with
adaptive-margin-enhanced contrastive learning and sends the K prototypes back."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flcore.clients.clienttgp import ClientFedTGP
from flcore.exchange import Payload
from flcore.per_class import per_class_means
from flcore.server_training import train_on_rows
from flcore.servers.serverproto import NearestPrototypeSettings, PrototypeServer
from flcore.settings import option, raise_first_failed


@dataclass(frozen=True)
class FedTGPSettings(NearestPrototypeSettings):
    title = "FedTGP"
    description = "trains the prototypes on the server in batches of -lbs"
    server_epochs: int = option(100, "-se", "--server_epochs", help="FedTGP: server training epochs per round")
    # The default is the paper's own run script (TsingZ0/FedTGP system/run_me.sh, -lam 10).
    lamda: float = option(10.0, "-lam", "--lamda", help="FedTGP: weight of the prototype regularizer")
    # None: the run's -lr, which only the run's settings know, so the server resolves it (prepare); the reference
    # trains the prototypes at the clients' learning rate.
    server_learning_rate: float = option(None, "-slr", "--server_learning_rate",
                                         help="FedTGP: learning rate of the server's training; -lr when not given")
    margin_threshold: float = option(100.0, "-mart", "--margin_threshold",
                                     help="FedTGP: upper bound of the adaptive margin (the reference library)")

    def validate(self):
        raise_first_failed([
            (self.server_epochs >= 1, f"-se must be >= 1, got {self.server_epochs}"),
            (self.margin_threshold >= 0, f"-mart must be >= 0, got {self.margin_threshold}"),
            (self.lamda >= 0, f"-lam must be >= 0, got {self.lamda}"),
            (self.server_learning_rate is None or self.server_learning_rate > 0,
             f"-slr must be > 0, got {self.server_learning_rate}"),
        ])


class TrainablePrototypes(nn.Module):
    """Class id -> global prototype; the hidden width equals the feature dimension, as in the reference."""

    def __init__(self, num_classes, feature_dim):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, feature_dim)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, feature_dim))

    def forward(self):
        """All K prototypes [K, D]."""
        return self.mlp(self.embedding.weight)


def adaptive_margin(prototypes, classes, num_classes, threshold):
    """min(max over classes of the distance from a class's mean client prototype to the nearest other class's,
    threshold); 0 when fewer than two classes arrived."""
    means, counts = per_class_means(prototypes, classes, num_classes)
    present = torch.nonzero(counts).squeeze(1)
    if len(present) < 2:
        return 0.0
    centers = means[present]
    distances = torch.cdist(centers, centers)
    distances.fill_diagonal_(float("inf"))
    return min(float(distances.min(1).values.max()), threshold)


def margin_contrastive_loss(features, labels, prototypes, margin):
    """Cross-entropy over negative Euclidean distances to all prototypes, the own class's distance enlarged by
    `margin`: features must be closer to their own prototype than to any other by at least the margin."""
    squared = (features.pow(2).sum(1, keepdim=True) - 2 * features @ prototypes.T
               + prototypes.pow(2).sum(1)[None, :])
    distances = squared.clamp(min=1e-12).sqrt()
    return F.cross_entropy(-(distances + margin * F.one_hot(labels, prototypes.shape[0])), labels)


class ServerFedTGP(PrototypeServer):
    Settings = FedTGPSettings
    metric_names = ("server_loss", "margin")

    def prepare(self):
        super().prepare()
        # -slr, or by default the run's -lr.
        self.server_lr = self.settings.server_learning_rate
        if self.server_lr is None:
            self.server_lr = self.context.learning_rate
        raise_first_failed([(self.server_lr > 0, f"-slr must be > 0, got {self.server_lr}")])
        self.prototype_net = TrainablePrototypes(self.num_classes, self.context.feature_dim).to(self.device)
        self.shuffle_rng = torch.Generator().manual_seed(self.seed)
        self.global_prototypes = None
        tqdm.write(f"FedTGP: lambda {self.settings.lamda}, server lr {self.server_lr}, "
                   f"server epochs {self.settings.server_epochs}, margin threshold {self.settings.margin_threshold}")

    def client_spec(self):
        return Payload(config={"lamda": self.settings.lamda, "proto_eval": self.settings.proto_eval})

    @classmethod
    def new_client(cls, setup, spec):
        return ClientFedTGP(setup, lamda=spec.config["lamda"], proto_eval=spec.config["proto_eval"])

    def update_knowledge(self, means, classes, counts):
        margin = adaptive_margin(means, classes, self.num_classes, self.settings.margin_threshold)

        def loss(index):
            return margin_contrastive_loss(means[index], classes[index], self.prototype_net(), margin)

        server_loss = train_on_rows(loss, self.prototype_net.parameters(), len(classes), self.settings.server_epochs,
                                    self.context.batch_size, self.server_lr, self.shuffle_rng)
        with torch.no_grad():
            self.global_prototypes = self.prototype_net()
        self.round_metrics = {"server_loss": server_loss, "margin": margin}

    def knowledge(self):
        """All K trained global prototypes."""
        return Payload({"prototypes": self.global_prototypes,
                        "classes": torch.arange(self.num_classes, device=self.device)})

    def state_dict(self):
        state = super().state_dict()
        state.update(prototype_net=self.prototype_net.state_dict(), global_prototypes=self.global_prototypes,
                     shuffle_rng=self.shuffle_rng.get_state())
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.prototype_net.load_state_dict(state["prototype_net"])
        self.shuffle_rng.set_state(state["shuffle_rng"])
        prototypes = state["global_prototypes"]
        self.global_prototypes = None if prototypes is None else prototypes.to(self.device)
