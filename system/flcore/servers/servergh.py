"""FedGH (Yi et al., ACM MM 2023): the server trains one global head, Linear(feature_dim, K), with cross-entropy
on the clients' per-class mean features and sends it back; clients replace their heads by it."""
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flcore.clients.clientgh import ClientFedGH
from flcore.exchange import Payload, flatten
from flcore.server_training import train_on_rows
from flcore.servers.serverproto import PrototypeServer
from flcore.errors import UserError
from flutils.options import flag_or_default

# -slr's default for FedGH: the reference library's server_learning_rate default (HtFLlib system/main.py).
FEDGH_SERVER_LR = 0.01


class ServerFedGH(PrototypeServer):
    metric_names = ("server_loss",)

    def prepare(self):
        super().prepare()
        self.server_lr = flag_or_default(self.args.server_learning_rate, FEDGH_SERVER_LR, "-slr", above=0)
        self.head = nn.Linear(self.args.feature_dim, self.num_classes).to(self.device)
        self.shuffle_generator = torch.Generator().manual_seed(self.seed)
        tqdm.write(f"FedGH: server lr {self.server_lr}, server epochs {self.args.server_epochs}")

    @classmethod
    def new_client(cls, setup, spec):
        head = {k: tuple(v.shape) for k, v in setup.model.head.state_dict().items()}
        feature_dim = spec.config["feature_dim"]
        if head != {"weight": (setup.num_classes, feature_dim), "bias": (setup.num_classes,)}:
            raise UserError(f"FedGH shares one Linear({feature_dim}, {setup.num_classes}) head, but "
                            f"model {setup.model.model_name} has another head; use a family with linear heads only")
        return ClientFedGH(setup)

    def client_spec(self):
        return Payload(config={"feature_dim": self.args.feature_dim})

    def update_knowledge(self, means, classes, counts):
        def loss(index):
            return F.cross_entropy(self.head(means[index]), classes[index])

        self.round_metrics = {"server_loss": train_on_rows(
            loss, self.head.parameters(), len(classes), self.args.server_epochs, self.args.batch_size,
            self.server_lr, self.shuffle_generator)}

    def knowledge(self):
        """The global head's weights."""
        return Payload(flatten({k: v.detach().clone() for k, v in self.head.state_dict().items()}, "head"))

    def extra_state(self):
        state = super().extra_state()
        state.update(head=self.head.state_dict(), shuffle_generator=self.shuffle_generator.get_state())
        return state

    def load_extra_state(self, state):
        super().load_extra_state(state)
        self.head.load_state_dict(state["head"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
