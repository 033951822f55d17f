"""LG-FedAvg (Liang et al. 2020) for heterogeneous feature extractors: each client keeps its feature extractor;
the heads, which have the same shape everywhere, are averaged on the server weighted by training samples
(as the reference library does) and sent back.

Per round: upload = (head floats) per arrived client; download = (head floats) per selected client, from the
round after the first aggregation on."""
import json
from dataclasses import dataclass

from flcore.clients.clientlg import ClientLG
from flcore.exchange import Payload, flatten, unflatten
from flcore.parameters import weighted_average
from flcore.errors import UserError
from flcore.servers.serverbase import Server
from flcore.settings import Settings


def head_kind(model):
    """The head's class and parameter shapes, as text: heads of one kind can share one average."""
    shapes = {name: list(p.shape) for name, p in model.head.named_parameters()}
    return json.dumps([type(model.head).__name__, shapes])


def check_head(algorithm, setup, spec):
    """Every head must be of client 0's kind (in spec), so that one average (and one head module) serves all."""
    if head_kind(setup.model) != spec.config["head_kind"]:
        raise UserError(f"{algorithm} averages the clients' heads, but client {setup.client_id}'s "
                        f"{setup.model.model_name} head differs from client 0's {spec.config['head_model']} "
                        f"head; choose a model family whose heads match (one without ViTs, e.g. HtFE8)")


@dataclass(frozen=True)
class LGSettings(Settings):
    """LG-FedAvg has no flags of its own; the algorithms that extend it (FedGen) extend these settings."""
    title = "LG-FedAvg"


class ServerLG(Server):
    Settings = LGSettings

    def prepare(self):
        self.global_head = None
        # Client 0's head: the kind every head must be, and the module the server evaluates heads with (FedGen).
        reference = self.context.reference_model(0)
        self.head_template = reference.head.to(self.device)
        # The algorithm named in check_head's error: the title of the settings (LG-FedAvg, FedGen).
        self.head_spec = {"head_kind": head_kind(reference), "head_model": reference.model_name,
                          "algorithm": self.settings.title}

    def client_spec(self):
        return Payload(config=dict(self.head_spec))

    @classmethod
    def new_client(cls, setup, spec):
        check_head(spec.config["algorithm"], setup, spec)
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
