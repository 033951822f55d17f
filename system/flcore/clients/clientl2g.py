"""FedL2G client (Zhang et al., "FedL2G: Learning to Guide Local Training in Heterogeneous Federated Learning",
arXiv 2410.06490): local training adds lambda * MSE between each sample's features (FedL2G-feat) or logits
(FedL2G-logit) and the server's guiding vector of its label. The training data is split once: the first
-mqb x -lbs samples are the quiz set, which the model never trains on; the rest is the study set.

After training, the client measures how the guiding vectors should move: it takes one pseudo SGD step (at its local
learning rate) on -mdb study batches with the guided loss, and differentiates the cross-entropy on the quiz set
after that step w.r.t. the guiding vectors. The guiding vectors enter the step only through the quadratic guiding
loss, so this derivative needs only first-order derivatives of the model (the paper's point); autograd gives it
exactly. It uploads that gradient for the classes of those study batches."""
import torch
import torch.nn.functional as F
from torch.func import functional_call

from flcore.batching import shuffled_batches
from flcore.clients.clientbase import Client
from flcore.errors import UserError
from flcore.exchange import Payload, derive_seed

VARIANTS = ("feat", "logit")


def guiding_loss(guided, labels, guidance):
    """MSE between each sample's guided output [B, D] and its label's guiding vector (rows of guidance [K, D]),
    over all B x D entries."""
    return F.mse_loss(guided, guidance[labels])


def submodule_state(state, prefix):
    """The entries of a model's {name: tensor} under `prefix` ("base."), named as the submodule names them."""
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


class ClientFedL2G(Client):
    def __init__(self, setup, variant, lamda, quiz_batches, study_batches):
        super().__init__(setup)
        if variant not in VARIANTS:
            raise ValueError(f"FedL2G variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.lamda = lamda
        self.study_batches = study_batches
        num_quiz = quiz_batches * self.batch_size
        if num_quiz >= self.num_train:
            raise UserError(f"client {self.id}: -mqb {quiz_batches} x -lbs {self.batch_size} = {num_quiz} quiz "
                            f"samples leave none of its {self.num_train} training samples to study; lower -mqb")
        # The reference holds out the first samples (the generated splits are already shuffled).
        self.quiz_x, self.quiz_y = self.train_x[:num_quiz], self.train_y[:num_quiz]
        self.train_x, self.train_y = self.train_x[num_quiz:], self.train_y[num_quiz:]
        # Its own stream for the guidance step's batches, so that local training draws exactly what Local's would.
        self.guidance_rng = torch.Generator().manual_seed(derive_seed(setup.seed, 1))
        self.guidance = None  # [K, D] from the server
        self.train_model = True  # False during the server's warm-up rounds (-wu): only the guidance is learned
        self.upload_rows = None

    def receive(self, payload):
        """The server's guiding vectors [K, D] (D: feature_dim or K) and whether to train the model this round."""
        self.guidance = payload.tensors["guidance"].to(self.device)
        self.train_model = payload.config["train_model"]

    def guided_outputs(self, features, logits):
        return features if self.variant == "feat" else logits

    def training_loss(self, x, y):
        features = self.model.base(x)
        logits = self.model.head(features)
        loss = F.cross_entropy(logits, y)
        if self.guidance is not None and self.lamda > 0:
            loss = loss + self.lamda * guiding_loss(self.guided_outputs(features, logits), y, self.guidance)
        return loss

    def train(self):
        if self.train_model:
            super().train()
        else:
            self.batches_last_round = 0
        self.upload_rows = self.guidance_gradient() if self.guidance is not None else None

    def functional_outputs(self, state, x):
        """(features, logits) of the model with its parameters and buffers replaced by `state`."""
        features = functional_call(self.model.base, submodule_state(state, "base."), (x,))
        return features, functional_call(self.model.head, submodule_state(state, "head."), (features,))

    def guidance_gradient(self):
        """(gradient [C_i, D], classes [C_i]): d quiz loss / d guiding vectors after one guided pseudo step on
        -mdb study batches, for the C_i classes of those batches (the others' gradient is zero)."""
        self.model.train()
        params = {name: p.detach().requires_grad_() for name, p in self.model.named_parameters()}
        # Copies: the pseudo step's forward passes must not move the model's BatchNorm statistics.
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        guidance = self.guidance.detach().clone().requires_grad_()
        learning_rate = self.optimizer.param_groups[0]["lr"]

        batches = shuffled_batches(self.num_train, self.batch_size, self.guidance_rng)[:self.study_batches]
        study_loss, labels = 0.0, []
        for index in batches:
            x, y = self.to_device(self.train_x[index], self.train_y[index])
            features, logits = self.functional_outputs({**params, **buffers}, x)
            study_loss = study_loss + F.cross_entropy(logits, y)
            if self.lamda > 0:
                study_loss = study_loss + self.lamda * guiding_loss(self.guided_outputs(features, logits), y,
                                                                    guidance)
            labels.append(y)
        study_loss = study_loss / len(batches)
        grads = torch.autograd.grad(study_loss, list(params.values()), create_graph=True, allow_unused=True)
        stepped = {name: p if g is None else p - learning_rate * g for (name, p), g in zip(params.items(), grads)}

        quiz = shuffled_batches(len(self.quiz_y), self.batch_size, self.guidance_rng)
        quiz_loss = 0.0
        for index in quiz:
            x, y = self.to_device(self.quiz_x[index], self.quiz_y[index])
            quiz_loss = quiz_loss + F.cross_entropy(self.functional_outputs({**stepped, **buffers}, x)[1], y)
        (gradient,) = torch.autograd.grad(quiz_loss / len(quiz), guidance, allow_unused=True)
        if gradient is None:  # lambda 0: the guidance does not reach the step
            gradient = torch.zeros_like(guidance)
        classes = torch.unique(torch.cat(labels))
        return gradient[classes].detach(), classes

    def upload(self):
        """The guiding vectors' gradient [C_i, D] and its classes [C_i] (nothing before the first guidance)."""
        if self.upload_rows is None:
            return Payload()
        gradient, classes = self.upload_rows
        return Payload({"grads": gradient, "classes": classes})

    def state_dict(self):
        state = super().state_dict()
        state.update(guidance=self.guidance, train_model=self.train_model, guidance_rng=self.guidance_rng.get_state())
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.guidance = None if state["guidance"] is None else state["guidance"].to(self.device)
        self.train_model = state["train_model"]
        self.guidance_rng.set_state(state["guidance_rng"])
