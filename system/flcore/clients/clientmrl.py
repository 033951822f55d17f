"""FedMRL client (Yi et al., NeurIPS 2024): the private model and the shared small model each extract a
representation of a sample; a private linear projector fuses the two (global first, then local) into one of the
private model's width -fd. Matryoshka learning: the first d1 dimensions of the fused representation feed the shared
model's header, all of them feed the private header, and the loss weighs both headers' cross-entropies. The client
predicts with the private header (the paper's inference: the whole model without the global header)."""
import torch
import torch.nn.functional as F
from torch import nn

from flcore.clients.clientbase import Client
from flcore.exchange import Payload, flatten, unflatten
from flcore.parameters import load_parameters, parameters_of


def matryoshka_loss(global_logits, local_logits, labels, global_weight, local_weight):
    """m_G * CE(global header on the nested slice) + m_F * CE(private header on the whole fused representation)."""
    return (global_weight * F.cross_entropy(global_logits, labels)
            + local_weight * F.cross_entropy(local_logits, labels))


class ClientFedMRL(Client):
    def __init__(self, setup, global_model, nested_dim, global_weight, local_weight):
        super().__init__(setup)
        self.global_model = global_model.to(self.device)
        self.nested_dim = nested_dim
        self.global_weight = global_weight
        self.local_weight = local_weight
        fused_dim = setup.model.feature_dim
        # Drawn from the client's own seed: the projector is personal and never travels.
        self.projector = nn.Linear(nested_dim + fused_dim, fused_dim).to(self.device)
        # One SGD at -lr for the private model, the shared model and the projector, as the paper updates all three.
        self.optimizer.add_param_group({"params": list(self.global_model.parameters())})
        self.optimizer.add_param_group({"params": list(self.projector.parameters())})

    def fuse(self, x):
        """The projector's fusion of [shared model's representation (d1), private model's representation (-fd)]."""
        return self.projector(torch.cat([self.global_model.base(x), self.model.base(x)], dim=1))

    def heads(self, fused):
        """(shared header's logits on the first d1 dimensions, private header's logits on all of them)."""
        return self.global_model.head(fused[:, :self.nested_dim]), self.model.head(fused)

    def training_loss(self, x, y):
        global_logits, local_logits = self.heads(self.fuse(x))
        return matryoshka_loss(global_logits, local_logits, y, self.global_weight, self.local_weight)

    def scores(self, x):
        return self.model.head(self.fuse(x))

    def train(self):
        self.global_model.train()
        self.projector.train()
        super().train()

    @torch.no_grad()
    def test_metrics(self):
        self.global_model.eval()
        self.projector.eval()
        return super().test_metrics()

    def receive(self, payload):
        """The server's averaged shared-model parameters."""
        load_parameters(self.global_model, unflatten(payload.tensors, "global"))

    def upload(self):
        """The shared model's parameters only (private model and projector stay here), with the sample count."""
        return Payload(flatten(parameters_of(self.global_model), "global"), {"samples": self.num_train})

    def state_modules(self):
        return [self.model, self.global_model, self.projector]

    def state_dict(self):
        state = super().state_dict()
        state.update(global_model=self.global_model.state_dict(), projector=self.projector.state_dict())
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.global_model.load_state_dict(state["global_model"])
        self.projector.load_state_dict(state["projector"])
