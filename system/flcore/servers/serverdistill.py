"""FedDistill (federated distillation, Jeong et al. 2018, as in the reference library HtFLlib): clients upload
per-class average logits; the server averages them per class over the clients that have the class and sends
the result back; clients add lambda * MSE(logits, global logits of the label) to cross-entropy.

Per round: upload = C_i * K floats per arrived client (C_i: classes it trained on); download = C * K floats per
selected client (C: classes with a global average), from the round after the first upload on."""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flcore.clients.clientdistill import ClientDistill
from flcore.exchange import Payload
from flcore.per_class import per_class_means
from flcore.servers.serverbase import Server
from flcore.settings import Settings, option, raise_first_failed


@dataclass(frozen=True)
class FedDistillSettings(Settings):
    title = "FedDistill"
    # The default is the reference library's -lam default.
    lamda: float = option(1.0, "-lam", "--lamda", help="FedDistill: weight of the logit regularizer")

    def validate(self):
        raise_first_failed([(self.lamda >= 0, f"-lam must be >= 0, got {self.lamda}")])


class ServerFedDistill(Server):
    Settings = FedDistillSettings

    def prepare(self):
        self.global_logits = None
        self.global_classes = None
        tqdm.write(f"FedDistill: lambda {self.settings.lamda}")

    def client_spec(self):
        return Payload(config={"lamda": self.settings.lamda})

    @classmethod
    def new_client(cls, setup, spec):
        return ClientDistill(setup, lamda=spec.config["lamda"])

    def payload_for(self, client_id):
        if self.global_logits is None:
            return None
        return Payload({"logits": self.global_logits, "classes": self.global_classes})

    def aggregate(self, uploads, timer):
        uploads = list(uploads.values())
        if uploads:
            logits = torch.cat([upload.tensors["logits"] for upload in uploads]).to(self.device)
            classes = torch.cat([upload.tensors["classes"] for upload in uploads]).to(self.device)
            means, counts = per_class_means(logits, classes, self.num_classes)
            self.global_classes = torch.nonzero(counts > 0).squeeze(1)
            self.global_logits = means[self.global_classes]
        return {}

    def state_dict(self):
        return {"global_logits": self.global_logits, "global_classes": self.global_classes}

    def load_state_dict(self, state):
        logits, classes = state["global_logits"], state["global_classes"]
        self.global_logits = None if logits is None else logits.to(self.device)
        self.global_classes = None if classes is None else classes.to(self.device)
