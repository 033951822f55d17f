"""LG-FedAvg (Liang et al. 2020) for heterogeneous feature extractors: each client keeps its feature extractor;
the heads, which have the same shape everywhere, are averaged on the server weighted by training samples
(as the reference library does) and sent back.

Per round: upload = (head floats) per arrived client; download = (head floats) per selected client, from the
round after the first aggregation on."""
import copy

from flcore.clients.clientlg import ClientLG
from flcore.parameters import float_count, parameters_of, weighted_average
from flcore.servers.serverbase import Server
from flutils.errors import UserError


def parameter_shapes(module):
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


class ServerLG(Server):
    def prepare(self):
        self.global_head = None

    def check_head(self, client_id, model):
        """Every head must be of client 0's kind, so that one average (and one head module) serves all."""
        if not self.clients:
            self.head_template = copy.deepcopy(model.head).to(self.device)
        elif (type(model.head) is not type(self.head_template)
              or parameter_shapes(model.head) != parameter_shapes(self.head_template)):
            raise UserError(f"{self.args.algorithm} averages the clients' heads, but client {client_id}'s "
                            f"{model.model_name} head differs from client 0's {self.clients[0].model.model_name} "
                            f"head; choose a model family whose heads match (one without ViTs, e.g. HtFE8)")

    def new_client(self, setup):
        self.check_head(setup.client_id, setup.model)
        return ClientLG(setup)

    def send_to(self, client):
        if self.global_head is None:
            return
        client.receive_head(self.global_head)
        self.download_floats += float_count(self.global_head)

    def collect(self, client):
        return {"head": parameters_of(client.model.head), "samples": client.num_train}

    def receive_heads(self, uploads):
        """The arrived heads; counts the upload and makes their average the new global head."""
        heads = [upload["head"] for upload in uploads]
        self.upload_floats += sum(float_count(head) for head in heads)
        if heads:
            self.global_head = weighted_average(heads, [upload["samples"] for upload in uploads])
        return heads

    def server_round(self, uploads, timer):
        self.receive_heads(list(uploads.values()))

    def extra_state(self):
        return {"global_head": self.global_head}

    def load_extra_state(self, state):
        head = state["global_head"]
        self.global_head = None if head is None else {k: v.to(self.device) for k, v in head.items()}
