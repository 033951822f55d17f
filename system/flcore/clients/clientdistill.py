"""FedDistill client: cross-entropy plus lambda * MSE between each sample's logits and the global average
logits of its label; after training it uploads its own per-class average logits."""
import torch
import torch.nn.functional as F

from flcore.clients.clientbase import Client
from flcore.exchange import Payload
from flcore.per_class import add_per_class


def logit_distillation_loss(logits, labels, teacher, known):
    """Mean squared error between logits [B, K] and the teacher rows [K, K] of their labels, over all B*K
    entries; samples whose label has no teacher row contribute zero (the reference library's convention)."""
    has_teacher = known[labels].unsqueeze(1).to(logits.dtype)
    return ((logits - teacher[labels]) * has_teacher).pow(2).sum() / logits.numel()


class ClientDistill(Client):
    def __init__(self, setup, lamda):
        super().__init__(setup)
        self.lamda = lamda
        self.teacher = None
        self.teacher_known = None
        self.logit_sums = torch.zeros(self.num_classes, self.num_classes, device=self.device)
        self.logit_counts = torch.zeros(self.num_classes, device=self.device)

    def receive(self, payload):
        """The server's average logits [C, K] of the classes it has seen."""
        logits, classes = payload.tensors["logits"], payload.tensors["classes"].to(self.device)
        self.teacher = torch.zeros(self.num_classes, self.num_classes, device=self.device)
        self.teacher[classes] = logits.to(self.device)
        self.teacher_known = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        self.teacher_known[classes] = True

    def train(self):
        self.logit_sums.zero_()
        self.logit_counts.zero_()
        super().train()

    def training_loss(self, x, y):
        logits = self.model(x)
        # The uploaded class logits are the averages of the training outputs of this round, as in the reference.
        add_per_class(self.logit_sums, self.logit_counts, logits.detach().float(), y)
        loss = F.cross_entropy(logits, y)
        if self.teacher is not None and self.lamda > 0:
            loss = loss + self.lamda * logit_distillation_loss(logits, y, self.teacher, self.teacher_known)
        return loss

    def upload(self):
        """Its average logits [C_i, K] over the classes it trained on this round, and those classes [C_i]."""
        classes = torch.nonzero(self.logit_counts > 0).squeeze(1)
        return Payload({"logits": self.logit_sums[classes] / self.logit_counts[classes].unsqueeze(1),
                        "classes": classes})
