"""FedKTL's Knowledge-Transfer Loop, written once, whatever the generator (flcore/generators/registry.py: -gen
chooses it, -GPath points at its file). Its flags (FedKTLSettings) default to the paper's values for the
StyleGAN3 of -algo FedKTL-stylegan-3; the other -algo FedKTL-* names change only the paper's lambda, mu and server
learning rate (serverktl_stylegan_xl.py, serverktl_stable_diffusion.py)."""
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from flcore.clients.clientktl import ClientKTL, TransferSettings
from flcore.exchange import Payload, flatten
from flcore.generators import registry
from flcore.generators.registry import AUTO, load_generator
from flcore.generators.stable_diffusion import StableDiffusionSettings
from flcore.generators.stylegan import STYLEGAN_3
from flcore.images import image_metrics, to_client_images
from flcore.ktl_ops import (
    PAPER_MARGIN,
    PAPER_SCALE,
    FeatureTransformer,
    FixedProjection,
    align_domains,
    class_mean_reset,
    simplex_etf,
)
from flcore.servers.serverbase import Server
from flcore.settings import option, raise_first_failed

ALIGN_GRAD_CLIP = 100.0
NORM_REFERENCE_SAMPLES = 256
ROUND_METRICS = ("align_mmd", "align_centroid", "class_mean_norm", "pair_latent_norm", "valid_latent_norm",
                 "centroid_shift", "image_distance", "image_std")
LAMDA_HELP = "weight of the centroid term of domain alignment; default: the paper's for the -algo's generator"
MU_HELP = "weight of the knowledge-transfer task; default: the paper's for the -algo's generator"
SLR_HELP = "learning rate of domain alignment; default: the paper's for the -algo's generator"


@dataclass(frozen=True)
class FedKTLSettings(StableDiffusionSettings):
    """FedKTL's flags, whatever the generator; the defaults are the paper's (StyleGAN3's lambda, mu and server lr;
    a subclass per -algo name redeclares those three)."""
    title = "FedKTL (every generator)"
    description = ("-lam, -mu, -slr default to the paper's values for the -algo's generator; -se: alignment epochs; "
                   "the ablations' defaults are the paper's (see docs/results.md: FedKTL ablations)")
    # -gen auto: with -GPath, the first of these that recognizes the file (else the last); without, auto_without_path.
    auto_generators = ("dcgan", "stylegan-3")
    auto_without_path = "face-dcgan"
    generator: str = option(AUTO, "-gen", "--generator",
                            help="the generator of flcore/generators/registry.py: auto (FedKTL-stylegan-*: a DCGAN "
                                 "checkpoint or a StyleGAN pickle in -GPath, else the pre-trained face DCGAN of "
                                 "gan-face-generate, else the untrained built-in; FedKTL-stable-diffusion: Stable "
                                 "Diffusion), stylegan-3, stylegan-xl, dcgan, face-dcgan, untrained, stable-diffusion")
    lamda: float = option(STYLEGAN_3.defaults.lamda, "-lam", "--lamda", help=LAMDA_HELP)
    mu: float = option(STYLEGAN_3.defaults.mu, "-mu", "--mu", help=MU_HELP)
    server_learning_rate: float = option(STYLEGAN_3.defaults.server_lr, "-slr", "--server_learning_rate",
                                         help=SLR_HELP)
    server_epochs: int = option(100, "-se", "--server_epochs", help="domain-alignment epochs per round")
    server_batch_size: int = option(100, "-sbs", "--server_batch_size")
    latent_rescale: bool = option(True, "-lrs", "--latent_rescale",
                                  help="Gaussian-prior generators (DCGAN, Stable Diffusion): move each class centroid "
                                       "to the prior's typical norm before rendering it and sending it as q (0: render "
                                       "the class mean as it is, the paper)")
    kt_norm: str = option("keep", "--kt_norm", choices=("update", "keep", "aux"),
                          help="BatchNorm in the client's forward of generated images: 'update' lets them update the "
                               "running statistics (the original code), 'keep' normalizes them with their batch "
                               "statistics but leaves the running ones alone, 'aux' gives them their own BatchNorm "
                               "affine parameters and statistics (auxiliary BN); no effect on models without "
                               "BatchNorm")
    etf: bool = option(True, "-etf", "--etf", help="ETF classifier (0: a plain linear head with cross-entropy)")
    margin: float = option(PAPER_MARGIN, "-margin", "--margin", help="angular margin m of the ETF loss (0: no margin)")
    etf_scale: float = option(PAPER_SCALE, "--etf_scale", help="scale s of the ETF logits s * cos (the paper's: 64)")
    logit_adjust: float = option(0.0, "--logit_adjust",
                                 help="evaluation adds tau * log of the client's smoothed training label frequencies "
                                      "to its logits: post-hoc logit adjustment (0: none, the paper)")
    margin_warmup: int = option(0, "--margin_warmup",
                                help="raise the margin linearly from 0 to -margin over this many rounds (0: full from "
                                     "the start, the paper)")
    client_grad_clip: float = option(100.0, "--client_grad_clip",
                                     help="FedKTL clients: gradient-norm clip (the paper's code: 100; 0: none)")
    feature_transformer: bool = option(True, "-ft", "--feature_transformer",
                                       help="train the feature transformer F (0: a fixed random linear map)")
    mmd: bool = option(True, "-mmd", "--mmd", help="the MMD term of domain alignment")
    centroid_reset: bool = option(True, "-cr", "--centroid_reset",
                                  help="reset the centroids to class means of F(P) before and after alignment (the "
                                       "original: no effect)")
    reset_proj: bool = option(False, "-rp", "--reset_proj",
                              help="re-initialize each client's proj from the server's copy every round (the "
                                   "original's behaviour)")
    kt_pairs_per_class: int = option(1, "--kt_pairs_per_class",
                                     help="image-vector pairs rendered per class each round: the centroid and N - 1 "
                                          "latents around it (1: the centroid only, the paper)")
    kt_pair_spread: float = option(0.3, "--kt_pair_spread",
                                   help="where the extra latents of a class lie: (1 - s) * centroid + s * a fresh "
                                        "valid latent, made renderable (0: copies of the centroid, 1: unrelated valid "
                                        "latents)")
    kt_feature_norm: bool = option(False, "-kfn", "--kt_feature_norm",
                                   help="proj reads L2-normalized features of the generated images, so the task "
                                        "cannot pull on the feature norm (0: raw features, the paper)")
    mu_warmup: int = option(0, "--mu_warmup",
                            help="raise mu linearly from 0 over this many rounds (0: full mu from the start, the "
                                 "paper)")
    kt_base_grad: bool = option(True, "-kbg", "--kt_base_grad",
                                help="the transfer loss trains the feature extractor (0: only proj learns it; a "
                                     "diagnostic of how much of the task proj absorbs)")
    kt_diagnostics: bool = option(False, "-kdiag", "--kt_diagnostics",
                                  help="record, at every client step, the norms and cosine of the classification and "
                                       "the mu-weighted transfer gradients on the feature extractor (two extra "
                                       "backward passes; results unchanged)")

    def validate(self):
        raise_first_failed([
            (self.server_batch_size >= 2,
             f"-sbs must be >= 2 (BatchNorm needs 2 samples), got {self.server_batch_size}"),
            (self.gen_batch_size >= 1, f"-gbs must be >= 1, got {self.gen_batch_size}"),
            (self.margin >= 0, f"--margin must be >= 0, got {self.margin}"),
            (self.margin_warmup >= 0, f"--margin_warmup must be >= 0, got {self.margin_warmup}"),
            (self.etf_scale > 0, f"--etf_scale must be > 0, got {self.etf_scale}"),
            (self.logit_adjust >= 0, f"--logit_adjust must be >= 0, got {self.logit_adjust}"),
            (self.kt_pairs_per_class >= 1, f"--kt_pairs_per_class must be >= 1, got {self.kt_pairs_per_class}"),
            (0.0 <= self.kt_pair_spread <= 1.0, f"--kt_pair_spread must be in [0, 1], got {self.kt_pair_spread}"),
            (self.mu >= 0, f"-mu must be >= 0, got {self.mu}"),
            (self.mu_warmup >= 0, f"--mu_warmup must be >= 0, got {self.mu_warmup}"),
            (self.client_grad_clip >= 0, f"--client_grad_clip must be >= 0 (0: no clip), got {self.client_grad_clip}"),
            (self.lamda >= 0, f"-lam must be >= 0, got {self.lamda}"),
            (self.server_learning_rate > 0, f"-slr must be > 0, got {self.server_learning_rate}"),
            (self.server_epochs >= 1, f"-se must be >= 1, got {self.server_epochs}"),
            *self.stable_diffusion_checks(),
            (self.generator == AUTO or self.generator in registry.GENERATORS,
             f"unknown generator '{self.generator}' (-gen); choose from: {', '.join([AUTO, *registry.GENERATORS])}"),
            (not self.generator_path or getattr(registry.GENERATORS.get(self.generator), "reads_path", True),
             f"-gen {self.generator} reads no file, but -GPath {self.generator_path} was given; drop -GPath, or pass "
             f"-gen auto to load that file"),
        ])


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
    Settings = FedKTLSettings
    phases = ("eval", "train", "prototypes", "align", "generate")
    upload_phase = "prototypes"

    def prepare(self):
        settings = self.settings
        self.image_generator = load_generator(settings, self.context, self.cache)
        latent_dim = self.image_generator.latent_dim
        self.align_rng = torch.Generator().manual_seed(self.seed)
        self.etf = simplex_etf(self.num_classes, self.align_rng)
        transformer_cls = FeatureTransformer if settings.feature_transformer else FixedProjection
        self.transformer = transformer_cls(self.num_classes, latent_dim).to(self.device)
        # Centroids start as valid latents, so a class no client has shown yet still renders in-distribution.
        self.centroids = nn.Parameter(self.sample_valid(self.num_classes))
        trainable = [p for p in self.transformer.parameters() if p.requires_grad] + [self.centroids]
        self.align_optimizer = torch.optim.Adam(trainable, lr=settings.server_learning_rate)
        self.proj = nn.Linear(self.context.feature_dim, latent_dim)
        # The clients that hold proj's weights (they get them with their first pairs, or every round with -rp).
        self.proj_holders = set()
        self.pair_images = None
        self.pair_latents = None
        # Drawn from a stream of its own so that measuring leaves the run's random numbers unchanged.
        with torch.no_grad():
            reference = self.image_generator.sample_valid(NORM_REFERENCE_SAMPLES,
                                                          torch.Generator().manual_seed(self.seed + 1))
        self.valid_latent_norm = float(reference.float().norm(dim=1).mean())
        tqdm.write(f"FedKTL: lambda {settings.lamda}, mu {settings.mu}, server lr {settings.server_learning_rate}, "
                   f"latent dim {latent_dim}")

    def sample_valid(self, n):
        with torch.no_grad():
            return self.image_generator.sample_valid(n, self.align_rng).float().to(self.device)

    def client_spec(self):
        """The ETF (unless -etf 0) and what never changes of the clients' transfer task (mu and the margin come with
        each round's payload)."""
        settings = self.settings
        transfer = TransferSettings(
            feature_dim=self.context.feature_dim, latent_dim=self.image_generator.latent_dim,
            grad_clip=settings.client_grad_clip, kt_norm=settings.kt_norm, feature_norm=settings.kt_feature_norm,
            base_grad=settings.kt_base_grad, diagnostics=settings.kt_diagnostics, scale=settings.etf_scale,
            logit_adjust=settings.logit_adjust)
        return Payload({"etf": self.etf} if settings.etf else {}, dataclasses.asdict(transfer))

    @classmethod
    def new_client(cls, setup, spec):
        return ClientKTL(setup, spec.tensors.get("etf"), TransferSettings(**spec.config))

    def margin_at(self, round_index):
        """The angular margin of a round: the full -margin, or raised linearly over --margin_warmup rounds."""
        return linear_warmup(self.settings.margin, round_index, self.settings.margin_warmup)

    def mu_at(self, round_index):
        """The transfer weight of a round: the full -mu, or raised linearly over --mu_warmup rounds."""
        return linear_warmup(self.settings.mu, round_index, self.settings.mu_warmup)

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
        if self.settings.reset_proj or client_id not in self.proj_holders:
            payload.tensors.update(flatten(self.proj_state, "proj"))
            self.proj_holders.add(client_id)
        return payload

    def forget(self, client_id):
        self.proj_holders.discard(client_id)

    def aggregate(self, uploads, timer):
        settings = self.settings
        uploads = list(uploads.values())
        steps = client_step_metrics(uploads, settings.client_grad_clip)
        prototypes = (torch.cat([u.tensors["prototypes"] for u in uploads]) if uploads
                      else torch.empty(0, self.num_classes))
        labels = (torch.cat([u.tensors["classes"] for u in uploads]) if uploads
                  else torch.empty(0, dtype=torch.long))
        if len(prototypes) < 2:
            tqdm.write(f"round {self.round}: fewer than 2 prototypes arrived; keeping the previous pairs")
            self.round_metrics = {**dict.fromkeys(ROUND_METRICS, math.nan), **steps}
            self.round_images = None
            return {}
        with timer("align"):
            stats = align_domains(self.transformer, self.centroids, prototypes.to(self.device),
                                  labels.to(self.device), self.sample_valid, self.align_optimizer,
                                  settings.server_epochs, settings.server_batch_size, settings.lamda,
                                  self.align_rng, ALIGN_GRAD_CLIP, use_mmd=settings.mmd,
                                  reset_centroids=settings.centroid_reset,
                                  renderable=self.image_generator.renderable)
        previous = None if self.pair_latents is None else self.pair_latents[:self.num_classes]
        with timer("generate"):
            # Clients regress the latent that was rendered.
            self.pair_latents = self.pair_latents_for(self.centroids.detach())
            self.pair_images = self.render_pairs(self.pair_latents)
        class_latents = self.pair_latents[:self.num_classes]
        self.round_metrics = {"align_mmd": stats["mmd"], "align_centroid": stats["centroid"],
                              **self.latent_metrics(prototypes, labels),
                              "centroid_shift": centroid_shift(previous, class_latents),
                              **image_metrics(self.pair_images[:self.num_classes]), **steps}
        m = self.round_metrics
        parts = [f"alignment MMD {m['align_mmd']:.4f}", f"centroid MSE {m['align_centroid']:.4f}",
                 f"norms: class means {m['class_mean_norm']:.2f}, sent {m['pair_latent_norm']:.2f}, "
                 f"valid {m['valid_latent_norm']:.2f}",
                 f"images: pairwise distance {m['image_distance']:.3f}, std {m['image_std']:.3f}"]
        # Measurements of what has not happened yet (no transfer steps before the first pairs, no shift before a
        # second round) are nan: left out of the line, still recorded.
        if not math.isnan(m["client_grad_norm"]):
            parts.append(f"client gradient norm {m['client_grad_norm']:.1f}, "
                         f"{100 * m['clipped_fraction']:.0f} % of steps clipped")
        if not math.isnan(m["transfer_loss"]):
            parts.append(f"transfer MSE {m['transfer_loss']:.3f}")
        if not math.isnan(m["centroid_shift"]):
            parts.append(f"centroid shift {m['centroid_shift']:.3f}")
        tqdm.write(f"round {self.round}: " + " | ".join(parts))
        if not math.isnan(m["grad_cosine"]):
            tqdm.write(f"round {self.round}: feature-extractor gradients: classification "
                       f"{m['classification_grad_norm']:.2f}, mu * transfer {m['transfer_grad_norm']:.2f}, "
                       f"cosine {m['grad_cosine']:.3f}")
        names = self.context.class_names if len(self.context.class_names or ()) == self.num_classes else None
        self.round_images = (self.pair_images[:self.num_classes],
                             [names[c] if names else f"class {c}" for c in range(self.num_classes)])
        return {}

    @torch.no_grad()
    def pair_latents_for(self, centroids):
        """The latents to render: each class's centroid first (rows 0..K-1), then --kt_pairs_per_class - 1 more
        per class, each mixed from the centroid and a fresh valid latent, all made renderable."""
        latents = [self.image_generator.renderable(centroids.clone())]
        extra = self.settings.kt_pairs_per_class - 1
        if extra:
            spread = self.settings.kt_pair_spread
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
    def render_pairs(self, latents):
        """One image per latent, rendered in batches of -gbs, in the clients' shape and normalization."""
        batches = [self.image_generator.render(chunk) for chunk in latents.split(self.settings.gen_batch_size)]
        return to_client_images(torch.cat(batches), self.context.image_shape)

    def state_dict(self):
        return {
            "etf": self.etf,
            "transformer": self.transformer.state_dict(),
            "centroids": self.centroids.detach().cpu(),
            "align_optimizer": self.align_optimizer.state_dict(),
            "proj": self.proj.state_dict(),
            "align_rng": self.align_rng.get_state(),
            "pair_images": self.pair_images,
            "pair_latents": self.pair_latents,
            "proj_holders": sorted(self.proj_holders),
        }

    def load_state_dict(self, state):
        self.etf.copy_(state["etf"])
        self.transformer.load_state_dict(state["transformer"])
        with torch.no_grad():
            self.centroids.copy_(state["centroids"])
        self.align_optimizer.load_state_dict(state["align_optimizer"])
        self.proj.load_state_dict(state["proj"])
        self.align_rng.set_state(state["align_rng"])
        self.pair_images = None if state["pair_images"] is None else state["pair_images"].to(self.device)
        self.pair_latents = None if state["pair_latents"] is None else state["pair_latents"].to(self.device)
        self.proj_holders = set(state["proj_holders"])
