"""FedKD client (Wu et al., Nature Communications 2022): its own model is the private mentor; a small shared
mentee learns alongside it by adaptive mutual distillation, and only the mentee's updates travel, SVD-compressed
(flcore/svd.py)."""
import copy

import torch.nn.functional as F
from torch import nn

from flcore.clients.clientbase import Client, distillation_kl
from flcore.exchange import Payload, flatten, unflatten
from flcore.svd import svd_compress, svd_decompress


def shared_state(model):
    """The mentee's floating-point state (parameters and float buffers): what FedKD synchronizes."""
    return {name: t for name, t in model.state_dict().items() if t.is_floating_point()}


def mutual_distillation_loss(logits, features, mentee_logits, mentee_features, labels, hidden_map):
    """Both task losses, plus the mutual KL distillation and the hidden-feature MSE (mentee features mapped by
    `hidden_map` to the mentor's), divided by the sum of the task losses: the distillation counts more when both
    predict well. Each side learns from the other's detached output."""
    task = F.cross_entropy(logits, labels)
    mentee_task = F.cross_entropy(mentee_logits, labels)
    distill = (distillation_kl(logits, mentee_logits) + distillation_kl(mentee_logits, logits)
               + F.mse_loss(features, hidden_map(mentee_features)))
    return task + mentee_task + distill / (task + mentee_task).detach()


class ClientFedKD(Client):
    grad_clip = 10.0  # the reference clips at 10 (per model; here jointly) against divergence of the distillation

    def __init__(self, setup, mentee, feature_dim, mentee_learning_rate, energy):
        super().__init__(setup)
        self.mentee = copy.deepcopy(mentee).to(self.device)
        self.hidden_map = nn.Linear(feature_dim, feature_dim, bias=False).to(self.device)
        self.optimizer.add_param_group({"params": list(self.hidden_map.parameters())})
        self.optimizer.add_param_group({"params": list(self.mentee.parameters()), "lr": mentee_learning_rate})
        # The mentee as last synchronized with the server (None: never), and the SVD energy its upload keeps.
        self.synced_state = None
        self.energy = energy

    def training_loss(self, x, y):
        features = self.model.base(x)
        mentee_features = self.mentee.base(x)
        return mutual_distillation_loss(self.model.head(features), features, self.mentee.head(mentee_features),
                                        mentee_features, y, self.hidden_map)

    def train(self):
        self.mentee.train()
        super().train()

    def receive(self, payload):
        """The round's energy; the whole mentee (its floating-point state), or the server's compressed aggregate
        update, applied to the mentee as last synchronized; or neither when the client holds the current mentee."""
        self.energy = payload.config["energy"]
        full, update = unflatten(payload.tensors, "full"), unflatten(payload.tensors, "update")
        if update is not None:
            full = {name: base + svd_decompress(update[name], base.shape).to(self.device)
                    for name, base in self.synced_state.items()}
        if full is not None:
            self.synchronize(full)

    def synchronize(self, state):
        # Only the floating-point state travels; integer buffers (BatchNorm counters) stay local.
        self.mentee.load_state_dict(state, strict=False)
        self.synced_state = {name: t.detach().clone() for name, t in shared_state(self.mentee).items()}

    def upload(self):
        """The mentee's change since the last synchronization, compressed keeping the round's energy."""
        return Payload(flatten({name: svd_compress(t - self.synced_state[name], self.energy)
                                for name, t in shared_state(self.mentee).items()}, "delta"))

    def state_modules(self):
        return [self.model, self.mentee, self.hidden_map]

    def state_dict(self):
        state = super().state_dict()
        state.update(mentee=self.mentee.state_dict(), hidden_map=self.hidden_map.state_dict(),
                     synced_state=self.synced_state, energy=self.energy)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.mentee.load_state_dict(state["mentee"])
        self.hidden_map.load_state_dict(state["hidden_map"])
        self.synced_state = (None if state["synced_state"] is None
                             else {name: t.to(self.device) for name, t in state["synced_state"].items()})
        self.energy = state["energy"]
