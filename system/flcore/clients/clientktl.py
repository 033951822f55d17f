"""FedKTL client: ETF classifier with an angular margin, prototype upload, and the knowledge-transfer task
on the server's image-vector pairs."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flcore.batchnorm import AuxiliaryBatchNorm, running_stats_untouched
from flcore.clients.clientbase import Client
from flcore.exchange import Payload, unflatten
from flcore.ktl_ops import (
    PAPER_MARGIN,
    PAPER_SCALE,
    arc_margin_loss,
    etf_cosines,
    knowledge_transfer_loss,
    log_label_prior,
)


@dataclass(frozen=True)
class TransferSettings:
    """A FedKTL client's settings beyond local training that never change (main.py -h: the FedKTL groups); mu and
    the margin come with each round's payload."""
    feature_dim: int
    latent_dim: int
    grad_clip: float = 100.0  # 0: no clip
    kt_norm: str = "keep"  # BatchNorm mode for generated images: update, keep or aux (flcore/batchnorm.py)
    feature_norm: bool = False  # proj reads L2-normalized features
    base_grad: bool = True  # the transfer loss trains the feature extractor
    diagnostics: bool = False  # record the gradient norms and cosine of the two losses per step
    scale: float = PAPER_SCALE  # s of the ETF logits s * cos
    logit_adjust: float = 0.0  # tau of the post-hoc logit adjustment at evaluation


class ClientKTL(Client):
    def __init__(self, setup, etf, transfer: TransferSettings):
        super().__init__(setup)
        # The paper's code clips at 100; 0 turns clipping off (an infinite clip still measures the norms).
        self.grad_clip = transfer.grad_clip or math.inf
        # etf None: the ablation with a plain linear head trained with cross-entropy.
        self.etf = etf.to(self.device) if etf is not None else None
        self.scale = transfer.scale
        # --logit_adjust: the fixed ETF head has no bias, so it cannot encode the client's class prior; add it.
        self.prior_shift = None
        if transfer.logit_adjust:
            self.prior_shift = (transfer.logit_adjust * log_label_prior(self.train_y, self.num_classes)).to(self.device)
        # Each round's payload sets both before the client evaluates or trains (--margin_warmup, --mu_warmup);
        # until the first one, the paper's margin and no transfer task (there are no pairs yet anyway).
        self.margin = PAPER_MARGIN
        self.mu = 0.0
        # proj is trained with the model; its weights come from the server with the first pairs.
        self.proj = nn.Linear(transfer.feature_dim, transfer.latent_dim).to(self.device)
        self.optimizer.add_param_group({"params": list(self.proj.parameters())})
        self.kt_norm = transfer.kt_norm
        # 'aux': generated images get BatchNorm parameters and statistics of their own, trained with the model.
        self.aux_norm = AuxiliaryBatchNorm(self.model.base) if self.kt_norm == "aux" else None
        if self.aux_norm is not None and len(self.aux_norm.affine):
            self.optimizer.add_param_group({"params": list(self.aux_norm.affine)})
        self.pair_images = None
        self.pair_latents = None
        self.pair_order = torch.empty(0, dtype=torch.long)
        self.feature_norm = transfer.feature_norm
        self.base_grad = transfer.base_grad
        self.diagnostics = transfer.diagnostics
        self.transfer_losses = []  # the unweighted transfer MSE of the last round's steps
        self.gradient_records = []  # with --kt_diagnostics: (classification norm, transfer norm, cosine) per step

    def receive(self, payload):
        """The round's margin and mu; the server's image-vector pairs once it has them, and proj's weights when it
        sends them."""
        self.margin = payload.config["margin"]
        self.mu = payload.config["mu"]
        if "pair_latents" in payload.tensors:
            self.pair_images = payload.tensors["pair_images"].to(self.device)
            self.pair_latents = payload.tensors["pair_latents"].to(self.device)
        proj_state = unflatten(payload.tensors, "proj")
        if proj_state is not None:
            self.proj.load_state_dict(proj_state)

    def next_pairs(self):
        """A batch of pairs of the client's batch size, cycling through the K pairs in shuffled order."""
        needed = min(self.batch_size, len(self.pair_latents))
        while len(self.pair_order) < needed:
            fresh = torch.randperm(len(self.pair_latents), generator=self.rng)
            self.pair_order = torch.cat([self.pair_order, fresh])
        index, self.pair_order = self.pair_order[:needed], self.pair_order[needed:]
        index = index.to(self.device)
        return self.pair_images[index], self.pair_latents[index]

    def classification_loss(self, x, y):
        if self.etf is None:
            return F.cross_entropy(self.model(x), y)
        return arc_margin_loss(etf_cosines(self.model(x), self.etf), y, self.scale, self.margin)

    def generated_features(self, images):
        """base(x_G) under the --kt_norm mode: see flcore/batchnorm.py."""
        if self.kt_norm == "aux":
            return self.aux_norm(images)
        if self.kt_norm == "keep":
            with running_stats_untouched(self.model.base):
                return self.model.base(images)
        return self.model.base(images)

    def train(self):
        self.transfer_losses = []
        self.gradient_records = []
        super().train()

    def transfer_loss(self, images, latents):
        """The paper's MSE between proj(base(x_G)) and q, with the --kt_feature_norm / --kt_base_grad variants."""
        features = self.generated_features(images)
        if self.feature_norm:
            features = F.normalize(features, dim=1)
        if not self.base_grad:
            features = features.detach()
        return knowledge_transfer_loss(self.proj(features), latents)

    def training_loss(self, x, y):
        loss = self.classification_loss(x, y)
        if self.pair_latents is not None and self.mu > 0:
            images, latents = self.next_pairs()
            transfer = self.transfer_loss(images, latents)
            self.transfer_losses.append(transfer.detach())
            if self.diagnostics:
                self.record_gradients(loss, self.mu * transfer)
            loss = loss + self.mu * transfer
        return loss

    def record_gradients(self, classification, transfer):
        """Norms and cosine of the two losses' gradients on the feature extractor's parameters, without
        touching .grad (the step that follows is the same as without the measurement)."""
        shared = [p for p in self.model.base.parameters() if p.requires_grad]
        flat = []
        for loss in (classification, transfer):
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                                   for p, g in zip(shared, grads)]))
        norms = torch.stack([flat[0].norm(), flat[1].norm()])
        cosine = (flat[0] @ flat[1]) / norms.prod().clamp_min(1e-12)
        self.gradient_records.append(torch.cat([norms, cosine.view(1)]).detach())

    def scores(self, x):
        """The logits: the head's, or the scaled ETF cosines; with --logit_adjust, shifted by the client's log label
        prior. Their cross-entropy is the training loss without its margin."""
        logits = self.model(x) if self.etf is None else self.scale * etf_cosines(self.model(x), self.etf)
        return logits if self.prior_shift is None else logits + self.prior_shift

    def prototypes(self):
        """(P [C_i, K], classes [C_i]): per local class, the normalized mean of normalized head outputs."""
        sums, counts = self.class_sums(lambda x: F.normalize(self.model(x), dim=1))
        classes = torch.nonzero(counts).squeeze(1)
        return F.normalize(sums[classes], dim=1), classes

    def upload(self):
        """Its prototypes and their classes, and what its steps measured (for the server's round metrics)."""
        prototypes, classes = self.prototypes()

        def values(measured):
            return torch.stack(measured).flatten().tolist() if measured else []

        return Payload({"prototypes": prototypes, "classes": classes},
                       metrics={"grad_norms": values(self.grad_norms), "transfer_losses": values(self.transfer_losses),
                                "gradient_records": values(self.gradient_records)})

    def state_modules(self):
        return [self.model, self.proj] + ([self.aux_norm] if self.aux_norm is not None else [])

    def state_dict(self):
        state = super().state_dict()
        state.update(proj=self.proj.state_dict(), pair_order=self.pair_order)
        if self.aux_norm is not None:
            state["aux_norm"] = self.aux_norm.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.proj.load_state_dict(state["proj"])
        self.pair_order = state["pair_order"]
        if self.aux_norm is not None:
            self.aux_norm.load_state_dict(state["aux_norm"])
