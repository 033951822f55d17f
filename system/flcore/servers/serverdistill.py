"""FedDistill (federated distillation, Jeong et al. 2018, as in the reference library HtFLlib): clients upload
per-class average logits; the server averages them per class over the clients that have the class and sends
the result back; clients add lambda * MSE(logits, global logits of the label) to cross-entropy.

Per round: upload = C_i * K floats per arrived client (C_i: classes it trained on); download = C * K floats per
selected client (C: classes with a global average), from the round after the first upload on."""
import torch
from tqdm import tqdm

from flcore.clients.clientdistill import ClientDistill
from flcore.exchange import Payload
from flcore.per_class import per_class_means
from flcore.servers.serverbase import Server
from flutils.options import flag_or_default

DEFAULT_LAMBDA = 1.0  # the reference library's -lam default


class ServerFedDistill(Server):
    def prepare(self):
        self.lamda = flag_or_default(self.args.lamda, DEFAULT_LAMBDA, "-lam", at_least=0)
        self.global_logits = None
        self.global_classes = None
        tqdm.write(f"FedDistill: lambda {self.lamda}")

    def client_spec(self):
        return Payload(config={"lamda": self.lamda})

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

    def extra_state(self):
        return {"global_logits": self.global_logits, "global_classes": self.global_classes}

    def load_extra_state(self, state):
        logits, classes = state["global_logits"], state["global_classes"]
        self.global_logits = None if logits is None else logits.to(self.device)
        self.global_classes = None if classes is None else classes.to(self.device)
