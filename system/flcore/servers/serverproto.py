"""FedProto (Tan et al., AAAI 2022): the server averages the clients' per-class mean features into global
prototypes, weighted by each client's sample count of the class. Also the shared round of every server whose
clients upload per-class mean features (FedGH, FedTGP)."""
import math

import torch
from tqdm import tqdm

from flcore.clients.clientproto import ClientFedProto
from flcore.per_class import per_class_means
from flcore.servers.serverbase import Server
from flutils.options import flag_or_default

# -lam's default for FedProto: the reference library's example runs (HtFLlib system/examples.sh, -lam 10).
FEDPROTO_LAMDA = 10.0


class PrototypeServer(Server):
    """Clients upload (means, classes, counts); the server turns them into global knowledge of a new version
    and replies with it to the clients whose uploads arrived; a selected client holding an older version gets
    it at the start of its round. Subclasses define `aggregate`, `payload` and `metric_names`."""
    phases = ("eval", "train", "aggregate")
    metric_names = ()

    def prepare(self):
        self.version = 0

    def upload_size(self, means, classes, counts):
        """Floats one client uploads: its class means."""
        return means.numel()

    def aggregate(self, means, classes, counts):
        """Update the global knowledge from all arrived rows; sets `self.round_metrics`."""
        raise NotImplementedError

    def payload(self):
        """(arguments of the clients' `receive`, floats sent per client)."""
        raise NotImplementedError

    def deliver(self, clients):
        """The current global knowledge to each of `clients` (each loaded for it)."""
        if self.version == 0 or not clients:
            return
        arguments, floats = self.payload()
        for client in clients:
            with self.store.loaded(client):
                client.receive(*arguments)
                client.knowledge_version = self.version
            self.download_floats += floats

    def send_to(self, client):
        if client.knowledge_version != self.version:
            self.deliver([client])

    def collect(self, client):
        return client.class_means()

    def server_round(self, uploads, timer):
        arrived = [self.clients[client_id] for client_id in uploads]
        uploads = list(uploads.values())
        self.upload_floats += sum(self.upload_size(*upload) for upload in uploads)
        self.round_metrics = {name: math.nan for name in self.metric_names}
        if not uploads:
            tqdm.write(f"round {self.round}: no uploads arrived; keeping the global knowledge")
            return
        means, classes, counts = (torch.cat([u[i] for u in uploads]).to(self.device) for i in range(3))
        with timer("aggregate"):
            self.aggregate(means, classes, counts)
        self.version += 1
        self.deliver(arrived)

    def extra_state(self):
        return {"version": self.version}

    def load_extra_state(self, state):
        self.version = state["version"]


class ServerFedProto(PrototypeServer):
    def prepare(self):
        super().prepare()
        self.lamda = flag_or_default(self.args.lamda, FEDPROTO_LAMDA, "-lam", at_least=0)
        self.global_prototypes = torch.zeros(self.num_classes, self.args.feature_dim, device=self.device)
        self.present = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        tqdm.write(f"FedProto: lambda {self.lamda}")

    def new_client(self, setup):
        return ClientFedProto(setup, lamda=self.lamda)

    def upload_size(self, means, classes, counts):
        """Class means and their sample counts (the weights of the average)."""
        return means.numel() + counts.numel()

    def aggregate(self, means, classes, counts):
        """A class that no arrived client holds keeps its previous global prototype."""
        averages, totals = per_class_means(means, classes, self.num_classes, weights=counts)
        arrived = totals > 0
        self.global_prototypes = torch.where(arrived[:, None], averages, self.global_prototypes)
        self.present = self.present | arrived

    def payload(self):
        return (self.global_prototypes, self.present), int(self.present.sum()) * self.global_prototypes.shape[1]

    def extra_state(self):
        state = super().extra_state()
        state.update(global_prototypes=self.global_prototypes, present=self.present)
        return state

    def load_extra_state(self, state):
        super().load_extra_state(state)
        self.global_prototypes = state["global_prototypes"].to(self.device)
        self.present = state["present"].to(self.device)
