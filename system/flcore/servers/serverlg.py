"""LG-FedAvg (Liang et al. 2020) for heterogeneous feature extractors: each client keeps its feature extractor;
the heads, which have the same shape everywhere, are averaged on the server weighted by training samples
(as the reference library does) and sent back.

Per round: upload = (head floats) per arrived client; download = (head floats) per selected client, from the
round after the first aggregation on."""
from dataclasses import dataclass

from flcore.clients.clientlg import ClientLG
from flcore.exchange import Payload, flatten, unflatten
from flcore.parameters import weighted_average
from flcore.servers.serverbase import Server
from flcore.settings import Settings


@dataclass(frozen=True)
class LGSettings(Settings):
    """LG-FedAvg has no flags of its own; the algorithms that extend it (FedGen) extend these settings."""
    title = "LG-FedAvg"


class ServerLG(Server):
    Settings = LGSettings
    shared_head = "same"

    def prepare(self):
        self.global_head = None
        # Client 0's head, the module the server evaluates heads with (FedGen); every client's is alike.
        self.head_template = self.context.reference_model(0).head.to(self.device)

    @classmethod
    def new_client(cls, setup, spec):
        return ClientLG(setup)

    def payload_for(self, client_id):
        return None if self.global_head is None else Payload(flatten(self.global_head, "head"))

    def average_heads(self, uploads):
        """The arrived heads (payloads), whose average becomes the new global head."""
        heads = [unflatten(upload.tensors, "head") for upload in uploads]
        if heads:
            self.global_head = weighted_average(heads, [upload.config["samples"] for upload in uploads])
        return heads

    def aggregate(self, uploads, timer):
        self.average_heads(list(uploads.values()))
        return {}

    def state_dict(self):
        return {"global_head": self.global_head}

    def load_state_dict(self, state):
        head = state["global_head"]
        self.global_head = None if head is None else {k: v.to(self.device) for k, v in head.items()}
