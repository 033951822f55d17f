"""FedProto (Tan et al., AAAI 2022): the server averages the clients' per-class mean features into global
prototypes, weighted by each client's sample count of the class. Also the shared round of every server whose
clients upload per-class mean features (FedGH, FedTGP)."""
import math

import torch
from tqdm import tqdm

from flcore.clients.clientproto import ClientFedProto
from flcore.servers.serverbase import Server
from flutils.errors import UserError

# -lam's default for FedProto: the reference library's example runs (HtFLlib system/examples.sh, -lam 10).
FEDPROTO_LAMDA = 10.0


def resolve_lamda(args, default):
    lamda = args.lamda if args.lamda is not None else default
    if lamda < 0:
        raise UserError(f"-lam must be >= 0, got {lamda}")
    return lamda


def resolve_server_lr(args, default):
    lr = args.server_learning_rate if args.server_learning_rate is not None else default
    if lr <= 0:
        raise UserError(f"-slr must be > 0, got {lr}")
    return lr


def train_on_rows(batch_loss, parameters, rows, args, lr, generator):
    """-se epochs of SGD on `batch_loss(row indices)` over the uploaded rows, shuffled, in batches of -lbs
    (the server batch size the reference library uses for FedGH and FedTGP); returns the last epoch's mean loss."""
    optimizer = torch.optim.SGD(parameters, lr=lr)
    for _ in range(args.server_epochs):
        losses = []
        for index in torch.randperm(rows, generator=generator).split(args.batch_size):
            loss = batch_loss(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


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
        if self.version == 0 or not clients:
            return
        arguments, floats = self.payload()
        for client in clients:
            client.receive(*arguments)
            client.knowledge_version = self.version
            self.download_floats += floats

    def send(self, selected):
        self.deliver([client for client in selected if client.knowledge_version != self.version])

    def server_round(self, arrived, timer):
        uploads = [client.class_means() for client in arrived]
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
        self.lamda = resolve_lamda(self.args, FEDPROTO_LAMDA)
        self.global_prototypes = torch.zeros(self.num_classes, self.args.feature_dim, device=self.device)
        self.present = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        tqdm.write(f"FedProto: lambda {self.lamda}")

    def make_client(self, client_id, model, data, seed, train_slow):
        return ClientFedProto(self.args, client_id, model, data, seed, self.device, train_slow, lamda=self.lamda)

    def upload_size(self, means, classes, counts):
        """Class means and their sample counts (the weights of the average)."""
        return means.numel() + counts.numel()

    def aggregate(self, means, classes, counts):
        """A class that no arrived client holds keeps its previous global prototype."""
        sums = torch.zeros_like(self.global_prototypes).index_add_(0, classes, means * counts[:, None])
        totals = torch.zeros(self.num_classes, device=self.device).index_add_(0, classes, counts)
        arrived = totals > 0
        averages = sums / totals.clamp(min=1)[:, None]
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
