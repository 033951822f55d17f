"""FML client: deep mutual learning between the private model and the shared ("meme") model on local data."""
import torch
import torch.nn.functional as F

from flcore.clients.clientbase import Client, distillation_kl
from flcore.exchange import Payload, flatten, unflatten
from flcore.parameters import load_parameters, parameters_of

# The reference library clips each model's gradient norm to 10 to keep mutual learning from diverging.
GRAD_CLIP = 10.0


def mutual_loss(local_logits, meme_logits, labels, alpha, beta):
    """FML's two objectives, summed (each reaches only its own model because the KL targets are detached):
    alpha * CE + (1 - alpha) * KL(meme || local) for the private model,
    beta * CE + (1 - beta) * KL(local || meme) for the meme model."""
    local = alpha * F.cross_entropy(local_logits, labels)
    meme = beta * F.cross_entropy(meme_logits, labels)
    if alpha < 1:
        local = local + (1 - alpha) * distillation_kl(local_logits, meme_logits)
    if beta < 1:
        meme = meme + (1 - beta) * distillation_kl(meme_logits, local_logits)
    return local + meme


class ClientFML(Client):
    def __init__(self, setup, meme, alpha, beta):
        super().__init__(setup)
        self.meme = meme.to(self.device)
        self.alpha = alpha
        self.beta = beta
        self.optimizer.add_param_group({"params": list(self.meme.parameters())})

    def receive(self, payload):
        """The server's average meme parameters."""
        load_parameters(self.meme, unflatten(payload.tensors, "meme"))

    def upload(self):
        """The meme's parameters, weighted by its training samples in the server's average."""
        return Payload(flatten(parameters_of(self.meme), "meme"), {"samples": self.num_train})

    def train(self):
        self.meme.train()
        super().train()

    def training_loss(self, x, y):
        return mutual_loss(self.model(x), self.meme(x), y, self.alpha, self.beta)

    def optimizer_step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.unscale_gradients()
        for module in (self.model, self.meme):
            torch.nn.utils.clip_grad_norm_(module.parameters(), GRAD_CLIP)
        self.apply_gradients()

    def state_modules(self):
        return [self.model, self.meme]

    def state_dict(self):
        state = super().state_dict()
        state["meme"] = self.meme.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.meme.load_state_dict(state["meme"])
