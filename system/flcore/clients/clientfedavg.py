"""FedAvg client: trains the received global model on its data and uploads the trained model's state, its sample
count and its label counts (FedFTG's label sampling and class-level ensemble read the counts)."""
import torch

from flcore.clients.clientbase import Client
from flcore.exchange import Payload, flatten, unflatten
from flcore.fedavg import load_shared_state, shared_state


class ClientFedAvg(Client):
    def __init__(self, setup):
        super().__init__(setup)
        self.label_counts = torch.bincount(self.train_y, minlength=self.num_classes).float()

    def receive(self, payload):
        """The global model's state."""
        load_shared_state(self.model, unflatten(payload.tensors, "model"))

    def upload(self):
        return Payload({**flatten(shared_state(self.model), "model"), "label_counts": self.label_counts.clone()},
                       {"samples": self.num_train})
