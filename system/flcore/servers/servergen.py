"""FedGen (Zhu et al. ICML 2021) for heterogeneous feature extractors, as the reference library runs it: clients
share their heads (averaged as in LG-FedAvg) and their label counts; the server trains a conditional generator
(noise, label) -> feature so that the ensemble of the uploaded heads (logits weighted by training samples, as the
reference library does) classifies the generated features as their labels; clients add cross-entropy of their
head on generated features, with labels drawn from the label distribution of the uploaded label counts.

Per round: upload = (head floats + K label counts) per arrived client; download = (head floats + generator
parameters and BatchNorm statistics + K label probabilities) per selected client, from the round after the
first server update on."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from flcore.clients.clientgen import ClientFedGen, FeatureGenerator
from flcore.exchange import flatten
from flcore.servers.serverlg import LGSettings, ServerLG
from flcore.settings import option, raise_first_failed


@dataclass(frozen=True)
class FedGenSettings(LGSettings):
    title = "FedGen"
    server_epochs: int = option(100, "-se", "--server_epochs", help="FedGen: generator training steps per round")
    noise_dim: int = option(512, "-nd", "--noise_dim", help="FedGen: generator noise size")
    hidden_dim: int = option(512, "-hd", "--hidden_dim", help="FedGen: generator hidden width")
    generator_learning_rate: float = option(0.005, "-glr", "--generator_learning_rate",
                                            help="FedGen: Adam learning rate of the server's generator")

    def validate(self):
        raise_first_failed([(self.server_epochs >= 1, f"-se must be >= 1, got {self.server_epochs}")]
                           + [(ok, f"{flag} must be positive for FedGen")
                              for flag, ok in (("-nd", self.noise_dim >= 1), ("-hd", self.hidden_dim >= 1),
                                               ("-glr", self.generator_learning_rate > 0))])


class ServerFedGen(ServerLG):
    Settings = FedGenSettings
    phases = ("eval", "train", "generator")

    def prepare(self):
        super().prepare()
        settings = self.settings
        self.feature_generator = FeatureGenerator(settings.noise_dim, self.num_classes, settings.hidden_dim,
                                                  self.context.feature_dim).to(self.device)
        self.generator_optimizer = torch.optim.Adam(self.feature_generator.parameters(),
                                                    lr=settings.generator_learning_rate)
        # Draws the labels and the noise of the generator's training batches.
        self.sample_rng = torch.Generator().manual_seed(self.seed)
        self.label_prior = None
        tqdm.write(f"FedGen: noise dim {settings.noise_dim}, hidden dim {settings.hidden_dim}, generator lr "
                   f"{settings.generator_learning_rate}, {settings.server_epochs} generator steps per round")

    def client_spec(self):
        spec = super().client_spec()
        spec.config.update(noise_dim=self.settings.noise_dim, hidden_dim=self.settings.hidden_dim,
                           feature_dim=self.context.feature_dim)
        return spec

    @classmethod
    def new_client(cls, setup, spec):
        return ClientFedGen(setup, noise_dim=spec.config["noise_dim"], hidden_dim=spec.config["hidden_dim"],
                            feature_dim=spec.config["feature_dim"])

    def prepare_round(self, selected):
        self.generator_state = None if self.label_prior is None else {
            k: v.clone() for k, v in self.feature_generator.state_dict().items()}

    def payload_for(self, client_id):
        """The global head, then the generator (parameters and BatchNorm statistics) and the label distribution."""
        payload = super().payload_for(client_id)
        if self.label_prior is not None:
            payload.tensors.update(flatten(self.generator_state, "generator"), label_prior=self.label_prior)
        return payload

    def aggregate(self, uploads, timer):
        uploads = list(uploads.values())
        heads = self.average_heads(uploads)
        if not uploads:
            self.round_metrics = {"generator_loss": math.nan}
            return {}
        counts = torch.stack([upload.tensors["label_counts"] for upload in uploads]).sum(0)
        self.label_prior = counts / counts.sum()
        with timer("generator"):
            loss = self.train_generator(heads, [upload.config["samples"] for upload in uploads])
        self.round_metrics = {"generator_loss": loss}
        return {}

    def train_generator(self, heads, samples):
        """-se Adam steps on batches of labels drawn from the label distribution; returns the mean loss."""
        weights = [n / sum(samples) for n in samples]
        batch = max(2, self.context.batch_size)  # BatchNorm needs two samples
        self.feature_generator.train()
        total = 0.0
        for _ in range(self.settings.server_epochs):
            labels = torch.multinomial(self.label_prior, batch, replacement=True, generator=self.sample_rng)
            labels = labels.to(self.device)
            features = self.feature_generator.sample(labels, self.sample_rng)
            # One head module evaluated with each client's parameters (shared_head: all heads are alike).
            logits = sum(w * functional_call(self.head_template, head, (features,)) for w, head in zip(weights, heads))
            loss = F.cross_entropy(logits, labels)
            self.generator_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.generator_optimizer.step()
            total += loss.item()
        self.feature_generator.eval()
        return total / self.settings.server_epochs

    def state_dict(self):
        state = super().state_dict()
        state.update(generator=self.feature_generator.state_dict(), optimizer=self.generator_optimizer.state_dict(),
                     sample_rng=self.sample_rng.get_state(), label_prior=self.label_prior)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.feature_generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["optimizer"])
        self.sample_rng.set_state(state["sample_rng"])
        self.label_prior = state["label_prior"]
