"""FedL2G (Zhang et al., arXiv 2410.06490) in its two variants, FedL2G-feat (guiding vectors in feature space,
K x feature_dim) and FedL2G-logit (in logit space, K x K). The server initializes the K guiding vectors randomly
and learns them: each round it averages the clients' uploaded gradients per class (over the clients that uploaded
the class), clips the averaged gradient's norm to 100 (the reference library) and takes one SGD step at -slr.

Per round: upload = C_i * D floats per arrived client (C_i: classes of its guidance-step study batches); download =
K * D floats per selected client (all guiding vectors). During the first -wu rounds the clients only learn the
guidance, without training their models."""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flcore.clients.clientl2g import ClientFedL2G
from flcore.exchange import Payload
from flcore.per_class import per_class_means
from flcore.servers.serverbase import Server
from flcore.settings import Settings, option, raise_first_failed

# The authors' run script (TsingZ0/FedL2G system/run_me.sh): -slr 1e2 for FedL2G-feat, 0.1 for FedL2G-logit.
DEFAULT_SERVER_LEARNING_RATE = {"feat": 100.0, "logit": 0.1}
# The reference library clips the averaged gradient of the guiding vectors to this norm.
MAX_GRADIENT_NORM = 100.0


@dataclass(frozen=True)
class FedL2GSettings(Settings):
    title = "FedL2G"
    description = "FedL2G-feat and FedL2G-logit"
    # The reference adds the guiding loss unweighted (lambda 1).
    lamda: float = option(1.0, "-lam", "--lamda", help="FedL2G: weight of the guiding loss")
    server_learning_rate: float = option(None, "-slr", "--server_learning_rate",
                                         help="FedL2G: learning rate of the guiding vectors; when not given 100 "
                                              "(FedL2G-feat) or 0.1 (FedL2G-logit), the authors' run script")
    # The reference library's defaults: one study batch, one quiz batch.
    meta_study_batches: int = option(1, "-mdb", "--meta_study_batches",
                                     help="FedL2G: study batches of the guidance step's pseudo update")
    meta_quiz_batches: int = option(1, "-mqb", "--meta_quiz_batches",
                                    help="FedL2G: quiz batches (of -lbs samples) held out of each client's training data")
    # The reference's 50 would leave a short run untrained; the paper gives no warm-up.
    warm_up_rounds: int = option(0, "-wu", "--warm_up_rounds",
                                 help="FedL2G: first rounds in which clients only learn the guidance (the reference: 50)")

    def validate(self):
        raise_first_failed([
            (self.lamda >= 0, f"-lam must be >= 0, got {self.lamda}"),
            (self.server_learning_rate is None or self.server_learning_rate > 0,
             f"-slr must be > 0, got {self.server_learning_rate}"),
            (self.meta_study_batches >= 1, f"-mdb must be >= 1, got {self.meta_study_batches}"),
            (self.meta_quiz_batches >= 1, f"-mqb must be >= 1, got {self.meta_quiz_batches}"),
            (self.warm_up_rounds >= 0, f"-wu must be >= 0, got {self.warm_up_rounds}"),
        ])


def guidance_step(guidance, grads, classes, learning_rate):
    """One SGD step of the guiding vectors [K, D] on the per-class mean of the uploaded gradient rows [N, D]
    (classes [N]); a class without rows gets zero gradient. The mean gradient's norm is clipped to 100."""
    means, _ = per_class_means(grads, classes, len(guidance))
    scale = torch.clamp(MAX_GRADIENT_NORM / (means.norm() + 1e-6), max=1.0)
    return guidance - learning_rate * means * scale


class ServerFedL2G(Server):
    Settings = FedL2GSettings
    phases = ("eval", "train", "aggregate")
    variant = None  # "feat" or "logit", set by the two registered subclasses

    def prepare(self):
        dim = self.context.feature_dim if self.variant == "feat" else self.num_classes
        generator = torch.Generator().manual_seed(self.seed)
        # Random initial guiding vectors, standard normal as the reference's nn.Embedding.
        self.guidance = torch.randn(self.num_classes, dim, generator=generator).to(self.device)
        self.server_lr = self.settings.server_learning_rate or DEFAULT_SERVER_LEARNING_RATE[self.variant]
        tqdm.write(f"FedL2G-{self.variant}: lambda {self.settings.lamda}, guidance learning rate {self.server_lr}, "
                   f"warm-up rounds {self.settings.warm_up_rounds}")

    def client_spec(self):
        s = self.settings
        return Payload(config={"variant": self.variant, "lamda": s.lamda, "quiz_batches": s.meta_quiz_batches,
                               "study_batches": s.meta_study_batches})

    @classmethod
    def new_client(cls, setup, spec):
        c = spec.config
        return ClientFedL2G(setup, c["variant"], c["lamda"], c["quiz_batches"], c["study_batches"])

    def payload_for(self, client_id):
        return Payload({"guidance": self.guidance},
                       config={"train_model": self.round >= self.settings.warm_up_rounds})

    def aggregate(self, uploads, timer):
        rows = [u for u in uploads.values() if "grads" in u.tensors]
        if not rows:
            tqdm.write(f"round {self.round}: no guidance gradients arrived; keeping the guiding vectors")
            return {}
        grads = torch.cat([u.tensors["grads"] for u in rows]).to(self.device)
        classes = torch.cat([u.tensors["classes"] for u in rows]).to(self.device)
        with timer("aggregate"):
            self.guidance = guidance_step(self.guidance, grads, classes, self.server_lr)
        return {}

    def state_dict(self):
        return {"guidance": self.guidance}

    def load_state_dict(self, state):
        self.guidance = state["guidance"].to(self.device)


class ServerFedL2GFeat(ServerFedL2G):
    variant = "feat"


class ServerFedL2GLogit(ServerFedL2G):
    variant = "logit"
