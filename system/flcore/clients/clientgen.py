"""FedGen client: an LG-FedAvg client whose head also learns from features that the server's conditional
generator makes for labels drawn from the global label distribution."""
import torch
import torch.nn.functional as F
from torch import nn

from flcore.clients.clientlg import ClientLG
from flcore.exchange import unflatten


class FeatureGenerator(nn.Module):
    """FedGen's conditional generator: (Gaussian noise, one-hot label) -> a feature vector for the heads."""

    def __init__(self, noise_dim, num_classes, hidden_dim, feature_dim):
        super().__init__()
        self.noise_dim = noise_dim
        self.num_classes = num_classes
        self.hidden = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                    nn.ReLU())
        self.out = nn.Linear(hidden_dim, feature_dim)

    def forward(self, noise, labels):
        one_hot = F.one_hot(labels, self.num_classes).to(noise.dtype)
        return self.out(self.hidden(torch.cat([noise, one_hot], 1)))

    def sample(self, labels, rng):
        """Features for `labels`, with noise drawn on the CPU from `rng` (reproducible on any device)."""
        noise = torch.randn(len(labels), self.noise_dim, generator=rng).to(labels.device)
        return self(noise, labels)


class ClientFedGen(ClientLG):
    def __init__(self, setup, noise_dim, hidden_dim, feature_dim):
        super().__init__(setup)
        self.label_counts = torch.bincount(self.train_y, minlength=self.num_classes).float()
        self.feature_generator = FeatureGenerator(noise_dim, self.num_classes, hidden_dim,
                                                  feature_dim).to(self.device).eval()
        self.label_prior = None

    def receive(self, payload):
        """The global head; once the server has trained it, its generator (parameters and BatchNorm statistics)
        and the label distribution [K]."""
        super().receive(payload)
        generator_state = unflatten(payload.tensors, "generator")
        if generator_state is not None:
            self.feature_generator.load_state_dict(generator_state)
            self.label_prior = payload.tensors["label_prior"].cpu()

    def upload(self):
        """Its head and its label counts [K]."""
        payload = super().upload()
        payload.tensors["label_counts"] = self.label_counts
        return payload

    def training_loss(self, x, y):
        loss = F.cross_entropy(self.model(x), y)
        if self.label_prior is None:
            return loss
        labels = torch.multinomial(self.label_prior, self.batch_size, replacement=True, generator=self.rng)
        (labels,) = self.to_device(labels)
        with torch.no_grad():
            features = self.feature_generator.sample(labels, self.rng)
        return loss + F.cross_entropy(self.model.head(features), labels)
