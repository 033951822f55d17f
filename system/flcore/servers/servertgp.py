"""FedTGP (Zhang et al., AAAI 2024): trainable global prototypes. A small network maps each class id to its
global prototype (embedding -> Linear -> ReLU -> Linear); the server trains it on the clients' prototypes with
adaptive-margin-enhanced contrastive learning and sends the K prototypes back."""
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flcore.clients.clienttgp import ClientFedTGP
from flcore.exchange import Payload
from flcore.per_class import per_class_means
from flcore.server_training import train_on_rows
from flcore.servers.serverproto import PrototypeServer
from flutils.options import flag_or_default, raise_first_failed

# -lam's default for FedTGP: the paper's own run script (TsingZ0/FedTGP system/run_me.sh, -lam 10).
FEDTGP_LAMDA = 10.0


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
    metric_names = ("server_loss", "margin")

    @classmethod
    def add_flags(cls, parser):
        group = parser.add_argument_group(
            "FedTGP", "-lam defaults to 10, -slr to -lr; trains on the server for -se epochs in batches of -lbs")
        group.add_argument("-mart", "--margin_threshold", type=float, default=100.0,
                           help="FedTGP: upper bound of the adaptive margin (the reference library)")

    @classmethod
    def check_flags(cls, args):
        raise_first_failed([(args.margin_threshold >= 0, f"-mart must be >= 0, got {args.margin_threshold}")])

    def prepare(self):
        super().prepare()
        self.lamda = flag_or_default(self.args.lamda, FEDTGP_LAMDA, "-lam", at_least=0)
        # The reference trains the prototypes at the clients' learning rate.
        self.server_lr = flag_or_default(self.args.server_learning_rate, self.args.local_learning_rate, "-slr",
                                         above=0)
        self.prototype_net = TrainablePrototypes(self.num_classes, self.args.feature_dim).to(self.device)
        self.shuffle_generator = torch.Generator().manual_seed(self.seed)
        self.global_prototypes = None
        tqdm.write(f"FedTGP: lambda {self.lamda}, server lr {self.server_lr}, "
                   f"server epochs {self.args.server_epochs}, margin threshold {self.args.margin_threshold}")

    def client_spec(self):
        return Payload(config={"lamda": self.lamda})

    @classmethod
    def new_client(cls, setup, spec):
        return ClientFedTGP(setup, lamda=spec.config["lamda"])

    def update_knowledge(self, means, classes, counts):
        margin = adaptive_margin(means, classes, self.num_classes, self.args.margin_threshold)

        def loss(index):
            return margin_contrastive_loss(means[index], classes[index], self.prototype_net(), margin)

        server_loss = train_on_rows(loss, self.prototype_net.parameters(), len(classes), self.args.server_epochs,
                                    self.args.batch_size, self.server_lr, self.shuffle_generator)
        with torch.no_grad():
            self.global_prototypes = self.prototype_net()
        self.round_metrics = {"server_loss": server_loss, "margin": margin}

    def knowledge(self):
        """All K trained global prototypes."""
        return Payload({"prototypes": self.global_prototypes,
                        "classes": torch.arange(self.num_classes, device=self.device)})

    def extra_state(self):
        state = super().extra_state()
        state.update(prototype_net=self.prototype_net.state_dict(), global_prototypes=self.global_prototypes,
                     shuffle_generator=self.shuffle_generator.get_state())
        return state

    def load_extra_state(self, state):
        super().load_extra_state(state)
        self.prototype_net.load_state_dict(state["prototype_net"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        prototypes = state["global_prototypes"]
        self.global_prototypes = None if prototypes is None else prototypes.to(self.device)
