"""FedGH client (Yi et al., ACM MM 2023): trains its whole model with cross-entropy, uploads per-class mean
features, and replaces its head by the server's global head whenever it receives one."""
from flcore.clients.clientproto import PrototypeClient
from flcore.exchange import unflatten


class ClientFedGH(PrototypeClient):
    def receive(self, payload):
        """The server's global head."""
        self.model.head.load_state_dict(unflatten(payload.tensors, "head"))
