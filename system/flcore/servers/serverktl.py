"""FedKTL's Knowledge-Transfer Loop, written once; a generator adapter says how to draw valid latents and
render them (serverktl_stylegan_3.py, serverktl_stylegan_xl.py)."""
import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flcore.clients.clientktl import ClientKTL, TransferSettings
from flcore.exchange import Payload, flatten
from flcore.generators.adapter import GeneratorAdapter
from flcore.ktl_ops import FeatureTransformer, FixedProjection, align_domains, class_mean_reset, simplex_etf
from flcore.servers.serverbase import Server
from flcore.errors import UserError
from flutils.options import bool_flag, flag_or_default, raise_first_failed
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


def client_step_metrics(uploads, clip):
    """Over the steps of the last round of the clients whose uploads arrived (their payloads' metrics): the mean
    pre-clip gradient norm, the share of steps clipped, and the mean (unweighted) transfer loss."""
    def steps(name):
        return torch.tensor([value for upload in uploads for value in upload.metrics[name]], dtype=torch.float32)

    norms, transfer, records = steps("grad_norms"), steps("transfer_losses"), steps("gradient_records")
    metrics = {"client_grad_norm": math.nan, "clipped_fraction": math.nan,
               "transfer_loss": float(transfer.mean()) if len(transfer) else math.nan,
               "classification_grad_norm": math.nan, "transfer_grad_norm": math.nan, "grad_cosine": math.nan}
    if len(norms):
        metrics.update(client_grad_norm=float(norms.mean()),
                       clipped_fraction=float((norms > clip).float().mean()) if clip else 0.0)
    if len(records):
        classification, transfer, cosine = records.view(-1, 3).mean(0).tolist()
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
    phases = ("eval", "train", "prototypes", "align", "generate")
    upload_phase = "prototypes"

    @classmethod
    def add_flags(cls, parser):
        group = parser.add_argument_group(
            "FedKTL (every generator)",
            "-lam, -slr default to the generator's values from the paper; -se: alignment epochs")
        group.add_argument("-mu", "--mu", type=float, default=None,
                           help="weight of the knowledge-transfer task; default: the generator's value")
        group.add_argument("-sbs", "--server_batch_size", type=int, default=100)
        group.add_argument("-GPath", "--generator_path", default="",
                           help="generator pickle ({'G_ema': G}), DCGAN checkpoint ({'netG_state_dict': ...}) or "
                                "diffusers folder; empty: the generator chosen by -gen")
        bool_flag(group, "-lrs", "--latent_rescale", True,
                  "Gaussian-prior generators (DCGAN, Stable Diffusion): move each class centroid to the prior's "
                  "typical norm before rendering it and sending it as q (0: render the class mean as it is, the paper)")
        group.add_argument("--kt_norm", default="keep", choices=["update", "keep", "aux"],
                           help="BatchNorm in the client's forward of generated images: 'update' lets them update the "
                                "running statistics (the original code), 'keep' normalizes them with their batch "
                                "statistics but leaves the running ones alone, 'aux' gives them their own BatchNorm "
                                "affine parameters and statistics (auxiliary BN); no effect on models without "
                                "BatchNorm")
        group.add_argument("-gbs", "--gen_batch_size", type=int, default=4)
        group.add_argument("--image_every", type=int, default=1,
                           help="save the generated image grid every this many rounds (0: never)")
        ablation = parser.add_argument_group("FedKTL ablations and the original code's behaviour (defaults: the paper)")
        bool_flag(ablation, "-etf", "--etf", True, "ETF classifier (0: a plain linear head with cross-entropy)")
        ablation.add_argument("-margin", "--margin", type=float, default=0.5,
                              help="angular margin m of the ETF loss (0: no margin)")
        ablation.add_argument("--margin_warmup", type=int, default=0,
                              help="raise the margin linearly from 0 to -margin over this many rounds (0: full from "
                                   "the start, the paper)")
        ablation.add_argument("--client_grad_clip", type=float, default=100.0,
                              help="FedKTL clients: gradient-norm clip (the paper's code: 100; 0: none)")
        bool_flag(ablation, "-ft", "--feature_transformer", True,
                  "train the feature transformer F (0: a fixed random linear map)")
        bool_flag(ablation, "-mmd", "--mmd", True, "the MMD term of domain alignment")
        bool_flag(ablation, "-cr", "--centroid_reset", True,
                  "reset the centroids to class means of F(P) before and after alignment (the original: no effect)")
        bool_flag(ablation, "-rp", "--reset_proj", False,
                  "re-initialize each client's proj from the server's copy every round (the original's behaviour)")
        transfer = parser.add_argument_group(
            "FedKTL knowledge-transfer task (defaults: the paper; see the README's ablations)")
        transfer.add_argument("--kt_pairs_per_class", type=int, default=1,
                              help="image-vector pairs rendered per class each round: the centroid and N - 1 latents "
                                   "around it (1: the centroid only, the paper)")
        transfer.add_argument("--kt_pair_spread", type=float, default=0.3,
                              help="where the extra latents of a class lie: (1 - s) * centroid + s * a fresh valid "
                                   "latent, made renderable (0: copies of the centroid, 1: unrelated valid latents)")
        bool_flag(transfer, "-kfn", "--kt_feature_norm", False,
                  "proj reads L2-normalized features of the generated images, so the task cannot pull on the feature "
                  "norm (0: raw features, the paper)")
        transfer.add_argument("--mu_warmup", type=int, default=0,
                              help="raise mu linearly from 0 over this many rounds (0: full mu from the start, the "
                                   "paper)")
        bool_flag(transfer, "-kbg", "--kt_base_grad", True,
                  "the transfer loss trains the feature extractor (0: only proj learns it; a diagnostic of how much of "
                  "the task proj absorbs)")
        bool_flag(transfer, "-kdiag", "--kt_diagnostics", False,
                  "record, at every client step, the norms and cosine of the classification and the mu-weighted "
                  "transfer gradients on the feature extractor (two extra backward passes; results unchanged)")

    @classmethod
    def check_flags(cls, args):
        raise_first_failed([
            (args.server_batch_size >= 2,
             f"-sbs must be >= 2 (BatchNorm needs 2 samples), got {args.server_batch_size}"),
            (args.gen_batch_size >= 1, f"-gbs must be >= 1, got {args.gen_batch_size}"),
            (args.margin >= 0, f"--margin must be >= 0, got {args.margin}"),
            (args.margin_warmup >= 0, f"--margin_warmup must be >= 0, got {args.margin_warmup}"),
            (args.kt_pairs_per_class >= 1, f"--kt_pairs_per_class must be >= 1, got {args.kt_pairs_per_class}"),
            (0.0 <= args.kt_pair_spread <= 1.0, f"--kt_pair_spread must be in [0, 1], got {args.kt_pair_spread}"),
            (args.mu is None or args.mu >= 0, f"-mu must be >= 0, got {args.mu}"),
            (args.mu_warmup >= 0, f"--mu_warmup must be >= 0, got {args.mu_warmup}"),
            (args.client_grad_clip >= 0, f"--client_grad_clip must be >= 0 (0: no clip), got {args.client_grad_clip}"),
            (args.image_every >= 0, f"--image_every must be >= 0, got {args.image_every}"),
        ])

    def build_generator(self) -> GeneratorAdapter:
        """The adapter of this server's generator (flcore/generators/adapter.py)."""
        raise NotImplementedError

    def prepare(self):
        self.image_generator = self.build_generator()
        latent_dim = self.image_generator.latent_dim
        defaults = self.image_generator.defaults
        self.lamda = flag_or_default(self.args.lamda, defaults.lamda, "-lam", at_least=0)
        self.mu = flag_or_default(self.args.mu, defaults.mu, "-mu", at_least=0)
        self.server_lr = flag_or_default(self.args.server_learning_rate, defaults.server_lr, "-slr", above=0)
        self.torch_generator = torch.Generator().manual_seed(self.seed)
        self.etf = simplex_etf(self.num_classes, self.torch_generator)
        transformer_cls = FeatureTransformer if self.args.feature_transformer else FixedProjection
        self.transformer = transformer_cls(self.num_classes, latent_dim).to(self.device)
        # Centroids start as valid latents, so a class no client has shown yet still renders in-distribution.
        self.centroids = nn.Parameter(self.sample_valid(self.num_classes))
        trainable = [p for p in self.transformer.parameters() if p.requires_grad] + [self.centroids]
        self.align_optimizer = torch.optim.Adam(trainable, lr=self.server_lr)
        self.proj = nn.Linear(self.args.feature_dim, latent_dim)
        # The clients that hold proj's weights (they get them with their first pairs, or every round with -rp).
        self.proj_holders = set()
        self.pair_images = None
        self.pair_latents = None
        # Drawn from a stream of its own so that measuring leaves the run's random numbers unchanged.
        with torch.no_grad():
            reference = self.image_generator.sample_valid(NORM_REFERENCE_SAMPLES,
                                                          torch.Generator().manual_seed(self.seed + 1))
        self.valid_latent_norm = float(reference.float().norm(dim=1).mean())
        tqdm.write(f"FedKTL: lambda {self.lamda}, mu {self.mu}, server lr {self.server_lr}, latent dim {latent_dim}")

    def sample_valid(self, n):
        with torch.no_grad():
            return self.image_generator.sample_valid(n, self.torch_generator).float().to(self.device)

    def client_spec(self):
        """The ETF (unless -etf 0) and the transfer settings, with the latent size and mu of this generator."""
        args = self.args
        transfer = TransferSettings(
            feature_dim=args.feature_dim, latent_dim=self.image_generator.latent_dim, mu=self.mu, margin=args.margin,
            grad_clip=args.client_grad_clip, kt_norm=args.kt_norm, feature_norm=args.kt_feature_norm,
            base_grad=args.kt_base_grad, diagnostics=args.kt_diagnostics)
        return Payload({"etf": self.etf} if args.etf else {}, dataclasses.asdict(transfer))

    @classmethod
    def new_client(cls, setup, spec):
        return ClientKTL(setup, spec.tensors.get("etf"), TransferSettings(**spec.config))

    def margin_at(self, round_index):
        """The angular margin of a round: the full -margin, or raised linearly over --margin_warmup rounds."""
        return linear_warmup(self.args.margin, round_index, self.args.margin_warmup)

    def mu_at(self, round_index):
        """The transfer weight of a round: the full mu, or raised linearly over --mu_warmup rounds."""
        return linear_warmup(self.mu, round_index, self.args.mu_warmup)

    def prepare_round(self, selected):
        self.round_margin = self.margin_at(self.round)
        self.round_mu = self.mu_at(self.round)
        self.proj_state = None if self.pair_latents is None else {
            k: v.clone() for k, v in self.proj.state_dict().items()}

    def payload_for(self, client_id):
        """The round's margin and mu; then the image-vector pairs, and proj's weights to a client without them
        (or to every client with -rp)."""
        payload = Payload(config={"margin": self.round_margin, "mu": self.round_mu})
        if self.pair_latents is None:
            return payload
        payload.tensors.update(pair_images=self.pair_images, pair_latents=self.pair_latents)
        if self.args.reset_proj or client_id not in self.proj_holders:
            payload.tensors.update(flatten(self.proj_state, "proj"))
            self.proj_holders.add(client_id)
        return payload

    def forget(self, client_id):
        self.proj_holders.discard(client_id)

    def aggregate(self, uploads, timer):
        uploads = list(uploads.values())
        steps = client_step_metrics(uploads, self.args.client_grad_clip)
        prototypes = (torch.cat([u.tensors["prototypes"] for u in uploads]) if uploads
                      else torch.empty(0, self.num_classes))
        labels = (torch.cat([u.tensors["classes"] for u in uploads]) if uploads
                  else torch.empty(0, dtype=torch.long))
        if len(prototypes) < 2:
            tqdm.write(f"round {self.round}: fewer than 2 prototypes arrived; keeping the previous pairs")
            self.round_metrics = {**dict.fromkeys(ROUND_METRICS, math.nan), **steps}
            return {}
        with timer("align"):
            stats = align_domains(self.transformer, self.centroids, prototypes.to(self.device),
                                  labels.to(self.device), self.sample_valid, self.align_optimizer,
                                  self.args.server_epochs, self.args.server_batch_size, self.lamda,
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
        return {}

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
            "proj_holders": sorted(self.proj_holders),
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
        self.proj_holders = set(state["proj_holders"])
