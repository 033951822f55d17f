"""FedProto client (Tan et al., AAAI 2022): cross-entropy plus a pull of each feature towards its class's global
prototype; predicts by the nearest global prototype (or, with --proto_eval head, by its head). Also the shared part
of every client that uploads per-class mean features (FedGH, FedTGP)."""
import torch
import torch.nn.functional as F

from flcore.clients.clientbase import Client
from flcore.exchange import Payload


class PrototypeClient(Client):
    """A client that uploads per-class mean features (FedProto, FedGH, FedTGP)."""
    # Whether the upload carries each class's sample count (FedProto weights its average by them).
    uploads_counts = False

    def upload(self):
        """means [C_i, D], classes [C_i] (and counts [C_i]): per local class, the mean base output over the
        training data, in eval mode (and the number of samples behind it)."""
        sums, counts = self.class_sums(self.model.base)
        classes = torch.nonzero(counts).squeeze(1)
        tensors = {"means": sums[classes] / counts[classes, None], "classes": classes}
        if self.uploads_counts:
            tensors["counts"] = counts[classes]
        return Payload(tensors)


def prototype_pull(features, labels, prototypes, present):
    """MSE between each feature and the global prototype of its label, over all B x D entries; samples whose
    class has no global prototype contribute zero."""
    has = present[labels, None]
    target = torch.where(has, prototypes[labels], features.detach())
    return F.mse_loss(features, target)


def nearest_prototype_scores(features, prototypes, present):
    """Negative Euclidean distance to each global prototype; classes without one score lowest (finite, so AUC
    stays defined)."""
    scores = -torch.cdist(features.float(), prototypes.float())
    return scores.masked_fill(~present, torch.finfo(scores.dtype).min)


class ClientFedProto(PrototypeClient):
    uploads_counts = True

    def __init__(self, setup, lamda, proto_eval):
        super().__init__(setup)
        self.lamda = lamda
        self.proto_eval = proto_eval  # "nearest" (global prototype) or "head"
        self.global_prototypes = None  # [K, D]; zero rows for classes without one
        self.present = None  # [K] bool: which classes have a global prototype

    def receive(self, payload):
        """Global prototypes [C, D] of the classes [C] that have one."""
        classes = payload.tensors["classes"].to(self.device)
        rows = payload.tensors["prototypes"].to(self.device)
        self.global_prototypes = torch.zeros(self.num_classes, rows.shape[1], dtype=rows.dtype, device=self.device)
        self.global_prototypes[classes] = rows
        self.present = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        self.present[classes] = True

    def training_loss(self, x, y):
        features = self.model.base(x)
        loss = F.cross_entropy(self.model.head(features), y)
        if self.global_prototypes is not None:
            loss = loss + self.lamda * prototype_pull(features, y, self.global_prototypes, self.present)
        return loss

    def scores(self, x):
        """Nearest global prototype, as the paper infers; the head until the first global prototypes arrive, and
        always with --proto_eval head."""
        if self.global_prototypes is None or self.proto_eval == "head":
            return self.model(x)
        return nearest_prototype_scores(self.model.base(x), self.global_prototypes, self.present)

    def state_dict(self):
        state = super().state_dict()
        state.update(global_prototypes=self.global_prototypes, present=self.present)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state["global_prototypes"] is not None:
            self.global_prototypes = state["global_prototypes"].to(self.device)
            self.present = state["present"].to(self.device)
