"""FedKD client (Wu et al., Nature Communications 2022): its own model is the private mentor; a small shared
mentee learns alongside it by adaptive mutual distillation, and only the mentee's updates travel, SVD-compressed.
Also the SVD compression both sides use."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from flcore.clients.clientbase import Client, distillation_kl


def kept_rank(singular_values, energy):
    """The fewest leading singular values whose squares hold at least `energy` of the total (0 for a zero matrix)."""
    squares = singular_values.double().pow(2)
    total = squares.sum()
    if total == 0:
        return 0
    return min(int((squares.cumsum(0) < energy * total).sum()) + 1, len(singular_values))


def svd_compress(tensor, energy):
    """A tensor of two or more dimensions, seen as [shape[0], rest], as truncated SVD factors {u, s, v} keeping
    `energy`; smaller tensors are sent whole as {full}."""
    if tensor.dim() < 2:
        return {"full": tensor.detach().clone()}
    u, s, v = torch.linalg.svd(tensor.detach().reshape(tensor.shape[0], -1), full_matrices=False)
    rank = kept_rank(s, energy)
    return {"u": u[:, :rank].contiguous(), "s": s[:rank].contiguous(), "v": v[:rank].contiguous()}


def svd_decompress(packed, shape):
    if "full" in packed:
        return packed["full"].reshape(shape)
    return ((packed["u"] * packed["s"]) @ packed["v"]).reshape(shape)


def packed_floats(update):
    """Floats in a compressed update {name: packed}: what actually travels."""
    return sum(t.numel() for packed in update.values() for t in packed.values())


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

    def __init__(self, args, client_id, model, data, seed, device, train_slow, mentee):
        super().__init__(args, client_id, model, data, seed, device, train_slow)
        self.mentee = copy.deepcopy(mentee).to(device)
        self.hidden_map = nn.Linear(args.feature_dim, args.feature_dim, bias=False).to(device)
        self.optimizer.add_param_group({"params": list(self.hidden_map.parameters())})
        self.optimizer.add_param_group({"params": list(self.mentee.parameters()), "lr": args.mentee_learning_rate})
        # The mentee as last synchronized with the server, and the server's version of it (None: never).
        self.synced_state = None
        self.synced_version = None

    def training_loss(self, x, y):
        features = self.model.base(x)
        mentee_features = self.mentee.base(x)
        return mutual_distillation_loss(self.model.head(features), features, self.mentee.head(mentee_features),
                                        mentee_features, y, self.hidden_map)

    def train(self):
        self.mentee.train()
        super().train()

    def receive_full(self, state, version):
        # Only the floating-point state travels; integer buffers (BatchNorm counters) stay local.
        self.mentee.load_state_dict(state, strict=False)
        self.synced_state = {name: t.detach().clone() for name, t in shared_state(self.mentee).items()}
        self.synced_version = version

    def receive_update(self, update, version):
        """The server's compressed aggregate update, applied to the mentee as last synchronized."""
        state = {name: base + svd_decompress(update[name], base.shape).to(self.device)
                 for name, base in self.synced_state.items()}
        self.receive_full(state, version)

    def upload(self, energy):
        """The mentee's change since the last synchronization, compressed keeping `energy`."""
        return {name: svd_compress(t - self.synced_state[name], energy)
                for name, t in shared_state(self.mentee).items()}

    def state_dict(self):
        state = super().state_dict()
        state.update(mentee=self.mentee.state_dict(), hidden_map=self.hidden_map.state_dict(),
                     synced_state=self.synced_state, synced_version=self.synced_version)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.mentee.load_state_dict(state["mentee"])
        self.hidden_map.load_state_dict(state["hidden_map"])
        self.synced_state = (None if state["synced_state"] is None
                             else {name: t.to(self.device) for name, t in state["synced_state"].items()})
        self.synced_version = state["synced_version"]
