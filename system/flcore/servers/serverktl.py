"""FedKTL's Knowledge-Transfer Loop, written once; a generator adapter says how to draw valid latents and
render them (serverktl_stylegan_3.py, serverktl_stylegan_xl.py)."""
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flcore.clients.clientktl import ClientKTL
from flcore.ktl_ops import FeatureTransformer, FixedProjection, align_domains, class_mean_reset, simplex_etf
from flcore.servers.serverbase import Server
from flutils.errors import UserError
from flutils.results import run_name
from flutils.visualize import save_image_grid

ALIGN_GRAD_CLIP = 100.0
NORM_REFERENCE_SAMPLES = 256
ROUND_METRICS = ("align_mmd", "align_centroid", "class_mean_norm", "pair_latent_norm", "valid_latent_norm",
                 "centroid_shift", "image_distance", "image_std")


def to_client_images(images, image_shape):
    """Generator output in [-1, 1] -> the clients' shape and normalization (mean 0.5, std 0.5 per channel):
    channels matched, resized so the short side fits, center-cropped."""
    channels, height, width = image_shape
    images = images.float().clamp(-1, 1)
    if images.shape[1] == 3 and channels == 1:
        images = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(1, True)
    elif images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != channels:
        raise UserError(f"the generator makes {images.shape[1]}-channel images; clients need {channels}")
    scale = max(height / images.shape[2], width / images.shape[3])
    size = (max(height, round(images.shape[2] * scale)), max(width, round(images.shape[3] * scale)))
    if size != tuple(images.shape[2:]):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    # [0, 1] -> normalized with mean 0.5, std 0.5 is the identity on [-1, 1] up to the clamp.
    return images[:, :, top:top + height, left:left + width].clamp(-1, 1).contiguous()


@torch.no_grad()
def image_metrics(images):
    """How distinct the K class images are: their mean pairwise RMS distance and mean per-image pixel std
    (both in the clients' normalization; a generator's blurred average image scores low on both)."""
    flat = images.flatten(1).float()
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    k = len(flat)
    pairwise = float(distances.sum() / (k * (k - 1))) if k > 1 else 0.0
    return {"image_distance": pairwise, "image_std": float(flat.std(dim=1).mean())}


def client_step_metrics(clients, clip):
    """Over the clients' steps of the last round: the mean pre-clip gradient norm, the share of steps clipped,
    and the mean (unweighted) transfer loss."""
    norms = [norm for client in clients for norm in client.grad_norms]
    transfer = [loss for client in clients for loss in client.transfer_losses]
    records = [record for client in clients for record in client.gradient_records]
    metrics = {"client_grad_norm": math.nan, "clipped_fraction": math.nan,
               "transfer_loss": float(torch.stack(transfer).mean()) if transfer else math.nan,
               "classification_grad_norm": math.nan, "transfer_grad_norm": math.nan, "grad_cosine": math.nan}
    if norms:
        norms = torch.stack(norms).float().cpu()
        metrics.update(client_grad_norm=float(norms.mean()),
                       clipped_fraction=float((norms > clip).float().mean()) if clip else 0.0)
    if records:
        classification, transfer, cosine = torch.stack(records).float().cpu().mean(0).tolist()
        metrics.update(classification_grad_norm=classification, transfer_grad_norm=transfer, grad_cosine=cosine)
    return metrics


def linear_warmup(value, round_index, warmup_rounds):
    """`value` scaled by round_index / warmup_rounds during the first warmup_rounds rounds, in full after
    (and always with warmup_rounds 0)."""
    if warmup_rounds == 0 or round_index >= warmup_rounds:
        return value
    return value * round_index / warmup_rounds


def centroid_shift(previous, latents):
    """How far the class latents moved since the last round, relative to their size (nan in the first round)."""
    if previous is None:
        return math.nan
    return float((latents - previous).norm(dim=1).mean() / previous.norm(dim=1).mean().clamp_min(1e-12))


class ServerKTL(Server):
    client_class = ClientKTL
    phases = ("eval", "train", "prototypes", "align", "generate")

    def build_generator(self):
        """Returns the generator adapter: `latent_dim`, `defaults` {lam, mu, slr},
        `sample_valid(n, generator)`, `renderable(latents)` (the latents it renders well; identity for W)
        and `render(latents)` -> images in [-1, 1]."""
        raise NotImplementedError

    def prepare(self):
        self.image_generator = self.build_generator()
        latent_dim = self.image_generator.latent_dim
        defaults = self.image_generator.defaults
        self.lam = self.args.lamda if self.args.lamda is not None else defaults["lam"]
        self.mu = self.args.mu if self.args.mu is not None else defaults["mu"]
        self.server_lr = (self.args.server_learning_rate if self.args.server_learning_rate is not None
                          else defaults["slr"])
        self.torch_generator = torch.Generator().manual_seed(self.seed)
        self.etf = simplex_etf(self.num_classes, self.torch_generator)
        transformer_cls = FeatureTransformer if self.args.feature_transformer else FixedProjection
        self.transformer = transformer_cls(self.num_classes, latent_dim).to(self.device)
        # Centroids start as valid latents, so a class no client has shown yet still renders in-distribution.
        self.centroids = nn.Parameter(self.sample_valid(self.num_classes))
        trainable = [p for p in self.transformer.parameters() if p.requires_grad] + [self.centroids]
        self.align_optimizer = torch.optim.Adam(trainable, lr=self.server_lr)
        self.proj = nn.Linear(self.args.feature_dim, latent_dim)
        self.pair_images = None
        self.pair_latents = None
        # Drawn from a stream of its own so that measuring leaves the run's random numbers unchanged.
        with torch.no_grad():
            reference = self.image_generator.sample_valid(NORM_REFERENCE_SAMPLES,
                                                          torch.Generator().manual_seed(self.seed + 1))
        self.valid_latent_norm = float(reference.float().norm(dim=1).mean())
        tqdm.write(f"FedKTL: lambda {self.lam}, mu {self.mu}, server lr {self.server_lr}, latent dim {latent_dim}")

    def sample_valid(self, n):
        with torch.no_grad():
            return self.image_generator.sample_valid(n, self.torch_generator).float().to(self.device)

    def make_client(self, client_id, model, data, seed, train_slow):
        return ClientKTL(self.args, client_id, model, data, seed, self.device, train_slow,
                         etf=self.etf if self.args.etf else None, latent_dim=self.image_generator.latent_dim,
                         mu=self.mu)

    def margin_at(self, round_index):
        """The angular margin of a round: the full -margin, or raised linearly over --margin_warmup rounds."""
        return linear_warmup(self.args.margin, round_index, self.args.margin_warmup)

    def mu_at(self, round_index):
        """The transfer weight of a round: the full mu, or raised linearly over --mu_warmup rounds."""
        return linear_warmup(self.mu, round_index, self.args.mu_warmup)

    def send(self, selected):
        for client in selected:
            client.margin = self.margin_at(self.round)
            client.mu = self.mu_at(self.round)
        if self.pair_latents is None:
            return
        pair_floats = self.pair_images.numel() + self.pair_latents.numel()
        proj_state = {k: v.clone() for k, v in self.proj.state_dict().items()}
        proj_floats = sum(v.numel() for v in proj_state.values())
        for client in selected:
            send_proj = self.args.reset_proj or not client.has_proj
            client.receive(self.pair_images, self.pair_latents, proj_state if send_proj else None)
            self.download_floats += pair_floats + (proj_floats if send_proj else 0)

    def server_round(self, arrived, timer):
        steps = client_step_metrics(arrived, self.args.client_grad_clip)
        with timer("prototypes"):
            uploads = [client.prototypes() for client in arrived]
        prototypes = torch.cat([p for p, _ in uploads]) if uploads else torch.empty(0, self.num_classes)
        labels = torch.cat([c for _, c in uploads]) if uploads else torch.empty(0, dtype=torch.long)
        self.upload_floats += prototypes.numel()
        if len(prototypes) < 2:
            tqdm.write(f"round {self.round}: fewer than 2 prototypes arrived; keeping the previous pairs")
            self.round_metrics = {**dict.fromkeys(ROUND_METRICS, math.nan), **steps}
            return
        with timer("align"):
            stats = align_domains(self.transformer, self.centroids, prototypes.to(self.device),
                                  labels.to(self.device), self.sample_valid, self.align_optimizer,
                                  self.args.server_epochs, self.args.server_batch_size, self.lam,
                                  self.torch_generator, ALIGN_GRAD_CLIP, use_mmd=self.args.mmd,
                                  reset_centroids=self.args.centroid_reset,
                                  renderable=self.image_generator.renderable)
        previous = None if self.pair_latents is None else self.pair_latents[:self.num_classes]
        with timer("generate"):
            # Clients regress the latent that was rendered.
            self.pair_latents = self.pair_latents_for(self.centroids.detach())
            self.pair_images = self.generate(self.pair_latents)
        class_latents = self.pair_latents[:self.num_classes]
        self.round_metrics = {"align_mmd": stats["mmd"], "align_centroid": stats["centroid"],
                              **self.latent_metrics(prototypes, labels),
                              "centroid_shift": centroid_shift(previous, class_latents),
                              **image_metrics(self.pair_images[:self.num_classes]), **steps}
        m = self.round_metrics
        tqdm.write(f"round {self.round}: alignment MMD {m['align_mmd']:.4f} | centroid MSE {m['align_centroid']:.4f}"
                   f" | norms: class means {m['class_mean_norm']:.2f}, sent {m['pair_latent_norm']:.2f}, "
                   f"valid {m['valid_latent_norm']:.2f} | images: pairwise distance {m['image_distance']:.3f}, "
                   f"std {m['image_std']:.3f} | client gradient norm {m['client_grad_norm']:.1f}, "
                   f"{100 * m['clipped_fraction']:.0f} % of steps clipped, transfer MSE {m['transfer_loss']:.3f}"
                   f" | centroid shift {m['centroid_shift']:.3f}")
        if not math.isnan(m["grad_cosine"]):
            tqdm.write(f"round {self.round}: feature-extractor gradients: classification "
                       f"{m['classification_grad_norm']:.2f}, mu * transfer {m['transfer_grad_norm']:.2f}, "
                       f"cosine {m['grad_cosine']:.3f}")
        self.save_images()

    @torch.no_grad()
    def pair_latents_for(self, centroids):
        """The latents to render: each class's centroid first (rows 0..K-1), then --kt_pairs_per_class - 1 more
        per class, each mixed from the centroid and a fresh valid latent, all made renderable."""
        latents = [self.image_generator.renderable(centroids.clone())]
        extra = self.args.kt_pairs_per_class - 1
        if extra:
            spread = self.args.kt_pair_spread
            around = centroids.repeat(extra, 1)
            mixed = (1 - spread) * around + spread * self.sample_valid(len(around))
            latents.append(self.image_generator.renderable(mixed))
        return torch.cat(latents)

    @torch.no_grad()
    def latent_metrics(self, prototypes, labels):
        """Mean norm of the class means of F(P) (what the paper renders), of the latents sent, and of valid ones."""
        self.transformer.eval()
        mapped = self.transformer(prototypes.to(self.device))
        means = torch.zeros(self.num_classes, mapped.shape[1], device=mapped.device)
        class_mean_reset(means, mapped, labels.to(mapped.device))
        present = torch.unique(labels)
        return {"class_mean_norm": float(means[present.to(mapped.device)].norm(dim=1).mean()),
                "pair_latent_norm": float(self.pair_latents[:self.num_classes].norm(dim=1).mean()),
                "valid_latent_norm": self.valid_latent_norm}

    @torch.no_grad()
    def generate(self, latents):
        """One image per latent, rendered in batches of -gbs, in the clients' shape and normalization."""
        batches = [self.image_generator.render(chunk) for chunk in latents.split(self.args.gen_batch_size)]
        return to_client_images(torch.cat(batches), self.dataset.image_shape)

    def save_images(self):
        every = self.args.image_every
        if not every or ((self.round + 1) % every and self.round + 1 != self.args.global_rounds):
            return
        folder = os.path.join(self.args.results_dir, run_name(self.args, self.run) + "_images")
        save_image_grid(os.path.join(folder, f"round_{self.round:04d}.png"), self.pair_images[:self.num_classes],
                        [f"class {c}" for c in range(self.num_classes)])

    def extra_state(self):
        return {
            "etf": self.etf,
            "transformer": self.transformer.state_dict(),
            "centroids": self.centroids.detach().cpu(),
            "align_optimizer": self.align_optimizer.state_dict(),
            "proj": self.proj.state_dict(),
            "torch_generator": self.torch_generator.get_state(),
            "pair_images": self.pair_images,
            "pair_latents": self.pair_latents,
        }

    def load_extra_state(self, state):
        self.etf.copy_(state["etf"])
        self.transformer.load_state_dict(state["transformer"])
        with torch.no_grad():
            self.centroids.copy_(state["centroids"])
        self.align_optimizer.load_state_dict(state["align_optimizer"])
        self.proj.load_state_dict(state["proj"])
        self.torch_generator.set_state(state["torch_generator"])
        self.pair_images = None if state["pair_images"] is None else state["pair_images"].to(self.device)
        self.pair_latents = None if state["pair_latents"] is None else state["pair_latents"].to(self.device)
