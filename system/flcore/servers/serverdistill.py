"""FedDistill (federated distillation, Jeong et al. 2018, as in the reference library HtFLlib): clients upload
per-class average logits; the server averages them per class over the clients that have the class and sends
the result back; clients add lambda * MSE(logits, global logits of the label) to cross-entropy.

Per round: upload = C_i * K floats per arrived client (C_i: classes it trained on); download = C * K floats per
selected client (C: classes with a global average), from the round after the first upload on."""
import torch
from tqdm import tqdm

from flcore.clients.clientdistill import ClientDistill
from flcore.servers.serverbase import Server
from flutils.errors import UserError

DEFAULT_LAMBDA = 1.0  # the reference library's -lam default


class ServerFedDistill(Server):
    def prepare(self):
        self.lam = self.args.lamda if self.args.lamda is not None else DEFAULT_LAMBDA
        if self.lam < 0:
            raise UserError(f"-lam must be >= 0 for FedDistill, got {self.lam}")
        self.global_logits = None
        self.global_classes = None
        tqdm.write(f"FedDistill: lambda {self.lam}")

    def make_client(self, client_id, model, data, seed, train_slow):
        return ClientDistill(self.args, client_id, model, data, seed, self.device, train_slow, lam=self.lam)

    def send(self, selected):
        if self.global_logits is None:
            return
        for client in selected:
            client.receive_logits(self.global_logits, self.global_classes)
            self.download_floats += self.global_logits.numel()

    def server_round(self, arrived, timer):
        uploads = [client.class_logits() for client in arrived]
        self.upload_floats += sum(logits.numel() for logits, _ in uploads)
        if not uploads:
            return
        sums = torch.zeros(self.num_classes, self.num_classes, device=self.device)
        counts = torch.zeros(self.num_classes, device=self.device)
        for logits, classes in uploads:
            sums.index_add_(0, classes, logits)
            counts.index_add_(0, classes, torch.ones(len(classes), device=self.device))
        self.global_classes = torch.nonzero(counts > 0).squeeze(1)
        self.global_logits = sums[self.global_classes] / counts[self.global_classes].unsqueeze(1)

    def extra_state(self):
        return {"global_logits": self.global_logits, "global_classes": self.global_classes}

    def load_extra_state(self, state):
        on_device = (lambda t: None if t is None else t.to(self.device))
        self.global_logits = on_device(state["global_logits"])
        self.global_classes = on_device(state["global_classes"])
