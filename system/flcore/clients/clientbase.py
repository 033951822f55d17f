"""What every simulated client does: hold its data and model in memory, train locally, evaluate."""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from flcore.batching import shuffled_batches
from flcore.exchange import Payload, derive_seed
from flcore.per_class import add_per_class
from flcore.trainmodel import build_family_model

EVAL_BATCH = 256
# --amp: the autocast dtype of local training (None: full precision).
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def distillation_kl(student_logits, teacher_logits):
    """KL(softmax(teacher) || softmax(student)) per sample, averaged over the batch; the teacher is a fixed
    target (no gradient reaches it)."""
    return F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits.detach(), 1),
                    reduction="batchmean", log_target=True)


def micro_auc(y_true, scores, num_classes):
    """Micro-averaged one-vs-rest AUC; defined for any label set because one-hot targets hold both 0s and 1s."""
    one_hot = np.eye(num_classes, dtype=np.int64)[y_true]
    return float(roc_auc_score(one_hot.ravel(), scores.ravel()))


@dataclass(frozen=True)
class ClientSetup:
    """What every client is built from: its identity, model and data, and the local-training settings."""
    client_id: int
    model: nn.Module
    data: object  # flutils.data.ClientData: train_x, train_y, test_x, test_y tensors
    seed: int
    device: torch.device
    num_classes: int
    batch_size: int
    local_epochs: int
    learning_rate: float
    learning_rate_decay: float | None = None  # per-round factor of the learning rate; None: constant
    train_slow: bool = False
    amp: str = "off"  # --amp: off, bf16 or fp16 autocast of the training steps
    compile_model: bool = False  # --compile: torch.compile the model's forward
    channels_last: bool = False  # --channels_last: the model's 4-d weights (and so its activations) NHWC


def client_setup(settings, data, client_id, run, device, image_shape, train_slow=False):
    """The ClientSetup of client `client_id` in run `run` of the RunSettings `settings`: its model is built from its
    own seed, so this process and a Flower node build the same one."""
    seed = derive_seed(settings.seed, run, client_id)
    torch.manual_seed(seed)
    channels, height, _ = image_shape
    model = build_family_model(settings.model_family, client_id, settings.num_classes, settings.feature_dim,
                               channels, height)
    return ClientSetup(
        client_id=client_id, model=model, data=data, seed=seed, device=device, num_classes=settings.num_classes,
        batch_size=settings.batch_size, local_epochs=settings.local_epochs,
        learning_rate=settings.local_learning_rate, train_slow=train_slow, amp=settings.amp,
        compile_model=settings.compile, channels_last=settings.channels_last,
        learning_rate_decay=settings.learning_rate_decay_gamma if settings.learning_rate_decay else None)


class Client:
    """A client of no algorithm (`Local`): trains and evaluates its own model. An algorithm's client adds what it
    receives (`receive`) and uploads (`upload`): payloads are its only contact with the server."""
    grad_clip = None

    def __init__(self, setup: ClientSetup):
        self.id = setup.client_id
        self.seed = setup.seed
        self.device = setup.device
        self.model = setup.model.to(setup.device)
        if setup.channels_last:  # convolutions then take and give NHWC activations
            self.model.to(memory_format=torch.channels_last)
        if setup.compile_model:
            self.model.compile()  # in place: the state_dict keeps its keys, so checkpoints and stores are unchanged
        self.num_classes = setup.num_classes
        data = setup.data
        # On CUDA the data lives on the GPU (one copy, no host-to-device copy per batch); the test labels stay on
        # the CPU, where the scores are compared and ranked.
        resident = setup.device if setup.device.type == "cuda" else torch.device("cpu")
        self.train_x, self.train_y = data.train_x.to(resident), data.train_y.to(resident)
        self.test_x, self.test_y = data.test_x.to(resident), data.test_y
        self.batch_size = setup.batch_size
        self.local_epochs = setup.local_epochs
        self.train_slow = setup.train_slow
        self.rng = torch.Generator().manual_seed(int(setup.seed))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=setup.learning_rate)
        self.scheduler = (torch.optim.lr_scheduler.ExponentialLR(self.optimizer, setup.learning_rate_decay)
                          if setup.learning_rate_decay is not None else None)
        self.amp_dtype = AMP_DTYPES[setup.amp]
        # fp16 needs its gradients scaled against underflow; bf16 has fp32's range and needs no scaler.
        self.scaler = torch.amp.GradScaler(setup.device.type) if setup.amp == "fp16" else None
        self.last_train_loss = float("nan")
        self.batches_last_round = 0
        self.grad_norms = []  # pre-clip gradient norms of the last round's steps (clipping clients only)

    def receive(self, payload):
        """Takes what the server sent (flcore/exchange.py: Payload)."""

    def upload(self):
        """What the client sends the server after training."""
        return Payload()

    @property
    def num_train(self):
        return len(self.train_y)

    def epochs_this_round(self):
        """A slow client trains a random number of epochs in [1, max(1, local_epochs // 2)] (the reference's rule)."""
        if not self.train_slow:
            return self.local_epochs
        upper = max(1, self.local_epochs // 2)
        return int(torch.randint(1, upper + 1, (1,), generator=self.rng))

    def to_device(self, *tensors):
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def train_batches(self):
        for index in shuffled_batches(self.num_train, self.batch_size, self.rng):
            yield self.to_device(self.train_x[index], self.train_y[index])

    def training_loss(self, x, y):
        return F.cross_entropy(self.model(x), y)

    def optimizer_step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        if self.grad_clip is not None:
            self.unscale_gradients()
            norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.grad_clip)
            self.grad_norms.append(norm.detach())
        self.apply_gradients()

    def backward(self, loss):
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_gradients(self):
        """The gradients at their true scale (fp16's grad scaler multiplies them), before they are clipped."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def apply_gradients(self):
        """The optimizer's step (with fp16: skipped when a gradient overflowed, and the scale adapted)."""
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def trainable_parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def train(self):
        self.model.train()
        self.grad_norms = []
        # Summed in float64 on the device, as Python would sum loss.item(), without a device sync per step.
        total, steps = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for _ in range(self.epochs_this_round()):
            for x, y in self.train_batches():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.training_loss(x, y)
                self.optimizer_step(loss)
                total += loss.detach()
                steps += 1
        if self.scheduler is not None:
            self.scheduler.step()
        self.last_train_loss = float(total) / max(steps, 1)
        self.batches_last_round = steps

    @torch.no_grad()
    def class_sums(self, embed):
        """(sums [K, d], counts [K]): embed(x) summed per label over the training data, model in eval mode;
        what prototype-style uploads (FedKTL, FedProto, FedGH, FedTGP) are made from."""
        self.model.eval()
        sums = None
        counts = torch.zeros(self.num_classes, device=self.device)
        for start in range(0, self.num_train, EVAL_BATCH):
            x, y = self.to_device(self.train_x[start:start + EVAL_BATCH], self.train_y[start:start + EVAL_BATCH])
            out = embed(x).float()
            if sums is None:
                sums = torch.zeros(self.num_classes, out.shape[1], device=self.device)
            add_per_class(sums, counts, out, y)
        return sums, counts

    def scores(self, x):
        """Per-class scores whose argmax is the prediction."""
        return self.model(x)

    def test_loss(self, scores, y):
        """The mean loss of `scores` (what `scores` gives) against the labels `y`: cross-entropy."""
        return float(F.cross_entropy(scores, y))

    @torch.no_grad()
    def test_metrics(self):
        """(correct, samples, micro AUC, loss) on the client's test split; AUC and loss are nan when it has no test
        data or the model's scores are not finite."""
        if len(self.test_y) == 0:
            return 0, 0, float("nan"), float("nan")
        self.model.eval()
        outputs = []
        for start in range(0, len(self.test_y), EVAL_BATCH):
            (x,) = self.to_device(self.test_x[start:start + EVAL_BATCH])
            outputs.append(self.scores(x).float().cpu())
        scores = torch.cat(outputs)
        correct = int((scores.argmax(1) == self.test_y).sum())
        if not torch.isfinite(scores).all():  # a diverged model: no ranking to score, but the run goes on
            return correct, len(self.test_y), float("nan"), float("nan")
        return (correct, len(self.test_y), micro_auc(self.test_y.numpy(), scores.numpy(), self.num_classes),
                self.test_loss(scores, self.test_y))

    def state_modules(self):
        """The modules whose parameters and buffers `state_dict()` holds: what a client-state store may free
        between turns and `load_state_dict` fills again."""
        return [self.model]

    def state_dict(self):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": self.rng.get_state(),
            "last_train_loss": self.last_train_loss,
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.rng.set_state(state["rng"])
        self.last_train_loss = state["last_train_loss"]
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
