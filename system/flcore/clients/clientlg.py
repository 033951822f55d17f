"""LG-FedAvg client: a local feature extractor and a head that the server replaces with the average head."""
from flcore.clients.clientbase import Client
from flcore.exchange import Payload, flatten, unflatten
from flcore.parameters import load_parameters, parameters_of


class ClientLG(Client):
    def receive(self, payload):
        """The server's average head."""
        load_parameters(self.model.head, unflatten(payload.tensors, "head"))

    def upload(self):
        """Its head's parameters, weighted by its training samples in the server's average."""
        return Payload(flatten(parameters_of(self.model.head), "head"), {"samples": self.num_train})
