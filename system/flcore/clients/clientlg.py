"""LG-FedAvg client: a local feature extractor and a head that the server replaces with the average head."""
from flcore.clients.clientbase import Client
from flcore.parameters import load_parameters


class ClientLG(Client):
    def receive_head(self, head):
        load_parameters(self.model.head, head)
