"""Training a DCGAN generator (flcore/generators/dcgan.py) unconditionally on a folder of images or an .npz, for
FedKTL's -gen dcgan -GPath. The command line is stylegan/pretrain_generator.py; everything it does lives here.

What trains stably on a small CPU budget: the DCGAN generator (BatchNorm, ReLU, tanh) against a DCGAN discriminator
with spectral norm on every convolution and no BatchNorm, the hinge loss (the non-saturating one as an option), Adam
with beta1 = 0.5, DiffAugment's translation on real and generated images alike (so the discriminator cannot
memorise a small set), and an exponential moving average of the generator's weights, which is what gets written
(its BatchNorm statistics re-estimated over many batches, since averaged weights do not fit the live ones').

The files next to --out FILE: FILE.ckpt (everything --resume needs), FILE.samples/step_<n>.png (one grid of fixed
latents every --sample_every steps) and FILE.quality.json (real_fake_scores of the written generator)."""
import copy
import glob
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from flcore.errors import UserError
from flcore.generators.dcgan import CHECKPOINT_KEY, DCGANGenerator, load_dcgan_checkpoint
from flcore.images import to_client_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIZES = (32, 64)
LOSSES = ("hinge", "nonsaturating")
CHECKPOINT_FORMAT = 1
GRID_SIDE = 8
BN_BATCHES = 16
MIN_IMAGES = 8   # the quality scores' halves and k-nearest neighbours need a few of each


@dataclass(frozen=True)
class PretrainSettings:
    images: str
    out: str
    steps: int = 3000
    size: int = 32
    batch_size: int = 64
    z_dim: int = 100
    width: int = 64            # the generator's last width; each block above it doubles it
    d_width: int = 64          # the discriminator's first width; each block below it doubles it
    loss: str = "hinge"
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema: float = 0.999
    augment: bool = True
    seed: int = 0
    device: str = "cpu"
    sample_every: int = 500
    checkpoint_every: int = 500
    quality_samples: int = 1000
    resume: bool = False
    force: bool = False

    # What a checkpoint must agree on to be resumed (with the data's hash); the rest may change between sessions.
    ARCHITECTURE = ("size", "batch_size", "z_dim", "width", "d_width", "loss", "lr", "beta1", "beta2", "ema",
                    "augment", "seed")


def check_settings(s):
    if s.size not in SIZES:
        raise UserError(f"--size {s.size} is not supported; choose from {', '.join(map(str, SIZES))}")
    if s.loss not in LOSSES:
        raise UserError(f"--loss {s.loss} is not supported; choose from {', '.join(LOSSES)}")
    for name, least in (("steps", 1), ("batch_size", 1), ("z_dim", 1), ("width", 1), ("d_width", 1),
                        ("quality_samples", MIN_IMAGES)):
        if getattr(s, name) < least:
            raise UserError(f"--{name} must be at least {least}, not {getattr(s, name)}")
    for name in ("sample_every", "checkpoint_every"):
        if getattr(s, name) < 0:
            raise UserError(f"--{name} must be 0 (never) or more, not {getattr(s, name)}")
    if not 0 <= s.ema < 1:
        raise UserError(f"--ema must lie in [0, 1), not {s.ema}")
    if s.device not in ("cpu", "cuda"):
        raise UserError(f"-dev {s.device} is not supported; choose cpu or cuda")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise UserError("-dev cuda, but torch sees no CUDA device; use -dev cpu")
    if s.resume and s.force:
        raise UserError("--resume continues a run and --force starts one over; give one of them")


def output_paths(out):
    """The files a run of --out `out` writes."""
    return {"generator": out, "checkpoint": out + ".ckpt", "samples": out + ".samples",
            "quality": out + ".quality.json"}


# ---- data ---------------------------------------------------------------------------------------------------

def load_images(path, size):
    """uint8 images [N, C, size, size] (C = 1 for an .npz of [N, H, W], else 3) from a folder (png/jpg, searched
    recursively, read as RGB) or an .npz whose key 'x' holds uint8 [N, H, W] or [N, H, W, 3]; images of another
    size are resized so the short side fits and center-cropped."""
    if os.path.isdir(path):
        images = _folder_images(path)
    elif os.path.isfile(path) and path.endswith(".npz"):
        images = _npz_images(path)
    else:
        raise UserError(f"--images {path} is neither a folder of png/jpg images nor an .npz file; check the path")
    if len(images) < MIN_IMAGES:
        raise UserError(f"only {len(images)} images in {path}; give at least {MIN_IMAGES}")
    if images.shape[2:] != (size, size):
        resized = []
        for start in range(0, len(images), 1024):
            batch = images[start:start + 1024].float() / 127.5 - 1
            batch = to_client_images(batch, (images.shape[1], size, size))
            resized.append(((batch + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(resized)
    return images.contiguous()


def _folder_images(folder):
    files = sorted(f for f in glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)
                   if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(f))
    if not files:
        raise UserError(f"no png/jpg images in {folder} (searched recursively); point --images at a folder that has "
                        f"some, or at an .npz")
    arrays, first = [], None
    for file in files:
        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise UserError(f"cannot read image {file} ({type(exc).__name__}); remove or replace it") from None
        if first is None:
            first = (file, array.shape)
        elif array.shape != first[1]:
            raise UserError(f"images of mixed sizes in {folder}: {os.path.relpath(first[0], folder)} is "
                            f"{first[1][1]}x{first[1][0]}, {os.path.relpath(file, folder)} is "
                            f"{array.shape[1]}x{array.shape[0]}; resize them to one size first")
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _npz_images(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise UserError(f"{path} has no key 'x' (it has: {', '.join(data.files) or 'none'}); save the "
                                f"images under 'x'")
            x = data["x"]
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}); check that it is an .npz file") from None
    if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 3)) or len(x) == 0:
        raise UserError(f"{path}: 'x' is {x.dtype} of shape {x.shape}; expected uint8 images [N, H, W] or "
                        f"[N, H, W, 3] with N > 0")
    x = torch.from_numpy(np.ascontiguousarray(x))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def to_unit_range(images):
    """uint8 -> float in [-1, 1], the generator's range."""
    return images.float() / 127.5 - 1


def fingerprint(settings, images):
    """What a checkpoint was trained on: the data's hash and the architecture's settings."""
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    architecture = {name: getattr(settings, name) for name in PretrainSettings.ARCHITECTURE}
    return json.dumps({"data": digest, "shape": list(images.shape[1:]), **architecture}, sort_keys=True)


# ---- networks -----------------------------------------------------------------------------------------------

def generator_widths(size, width):
    """DCGANGenerator's widths for `size` px: one block per doubling from 4x4, the last one `width` wide."""
    blocks = {32: 3, 64: 4}[size]
    return tuple(width * 2 ** i for i in reversed(range(blocks)))


class Discriminator(nn.Module):
    """images [N, C, R, R] -> scores [N]: 4x4 stride-2 convolutions with LeakyReLU(0.2) down to 4x4 (the width
    doubling each time), then a 4x4 convolution to one score; spectral norm on every convolution, no BatchNorm."""

    def __init__(self, size, img_channels, width):
        super().__init__()
        layers, c_in = [], img_channels
        for i in range({32: 3, 64: 4}[size]):
            c_out = width * 2 ** i
            layers += [nn.utils.spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(nn.utils.spectral_norm(nn.Conv2d(c_in, 1, 4)))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()


def translate(x, rng):
    """DiffAugment's translation: each image shifted by up to 1/8 of its side in each direction, zeros coming in;
    differentiable in x; the shifts are drawn from `rng` (on the CPU)."""
    n, _, h, w = x.shape
    pad = h // 8
    shift = torch.randint(-pad, pad + 1, (2, n, 1), generator=rng).to(x.device)
    rows = (torch.arange(h, device=x.device) + pad + shift[0]).view(n, h, 1)
    cols = (torch.arange(w, device=x.device) + pad + shift[1]).view(n, 1, w)
    padded = F.pad(x, [pad] * 4)
    return padded[torch.arange(n, device=x.device).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)


def losses(kind):
    """(discriminator loss(real scores, fake scores), generator loss(fake scores))."""
    if kind == "hinge":
        return (lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
                lambda fake: -fake.mean())
    return (lambda real, fake: F.softplus(-real).mean() + F.softplus(fake).mean(),
            lambda fake: F.softplus(-fake).mean())


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def with_standing_statistics(G, seed, batch_size, device):
    """A copy of G in eval mode whose BatchNorm statistics are the average over BN_BATCHES batches of its own
    outputs (fixed latents from `seed`): the averaged weights' own statistics, not the live generator's."""
    G = copy.deepcopy(G)
    for module in G.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None   # a cumulative average over the batches
    G.train()
    rng = torch.Generator().manual_seed(seed)
    for _ in range(BN_BATCHES):
        G(torch.randn(batch_size, G.z_dim, generator=rng).to(device))
    for module in G.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return G.eval().requires_grad_(False)


# ---- the quality number -------------------------------------------------------------------------------------

def random_features(images, seed=0):
    """Features of images [N, C, R, R] in [-1, 1] from a fixed random conv net (three 3x3 convolutions with ReLU and
    2x average pooling, He-initialised from `seed`): each layer's per-channel mean and std, concatenated. Needs no
    download; images are resized to 32 px and grayscale ones repeated to 3 channels first."""
    rng = torch.Generator().manual_seed(seed)
    x = images.float().cpu()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.shape[2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    features, c_in = [], 3
    for c_out in (32, 64, 128):
        weight = torch.randn(c_out, c_in, 3, 3, generator=rng) * (2 / (9 * c_in)) ** 0.5
        x = F.relu(F.conv2d(x, weight, padding=1))
        features += [x.mean((2, 3)), x.std((2, 3))]
        x = F.avg_pool2d(x, 2)
        c_in = c_out
    return torch.cat(features, 1).double()


def probe_accuracy(real_features, fake_features, seed=0):
    """Test accuracy of a logistic regression (L2, LBFGS) telling real from fake, trained on half of each set and
    tested on the other half: 0.5 = indistinguishable, 1.0 = always told apart."""
    rng = torch.Generator().manual_seed(seed)
    sets = []
    for label, feats in ((1.0, real_features), (0.0, fake_features)):
        order = torch.randperm(len(feats), generator=rng)
        half = len(feats) // 2
        sets.append((feats[order[:half]], feats[order[half:]], label))
    train_x = torch.cat([s[0] for s in sets])
    train_y = torch.cat([torch.full((len(s[0]),), s[2], dtype=torch.float64) for s in sets])
    test_x = torch.cat([s[1] for s in sets])
    test_y = torch.cat([torch.full((len(s[1]),), s[2], dtype=torch.float64) for s in sets])
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = train_x @ weight[:-1] + weight[-1]
        loss = F.binary_cross_entropy_with_logits(logits, train_y) + 1e-3 * weight[:-1].square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    with torch.no_grad():
        predicted = (test_x @ weight[:-1] + weight[-1] > 0).double()
    # Class-balanced, so a probe that says "real" to everything scores 0.5 on unequal halves too.
    return float(sum((predicted[test_y == y] == y).double().mean() for y in (0.0, 1.0)) / 2)


def knn_precision_recall(real_features, fake_features, k=3):
    """Kynkäänniemi et al. (2019): precision = share of fake samples inside some real sample's ball (radius: its
    distance to its k-th nearest real neighbour); recall = share of real samples inside some fake sample's ball."""
    mean, std = real_features.mean(0), real_features.std(0).clamp_min(1e-8)
    real, fake = (real_features - mean) / std, (fake_features - mean) / std

    def covered(points, support):
        radii = torch.cdist(support, support).kthvalue(k + 1, dim=1).values   # +1: each point's own zero distance
        return float((torch.cdist(points, support) <= radii).any(1).double().mean())
    return covered(fake, real), covered(real, fake)


def real_fake_scores(real, fake, seed=0):
    """How far generated images [N, C, R, R] in [-1, 1] are from real ones, in a fixed random conv net's feature
    space: the linear probe's accuracy (0.5 = indistinguishable) and k-NN precision and recall (1 = full cover)."""
    real_features, fake_features = random_features(real, seed), random_features(fake, seed)
    precision, recall = knn_precision_recall(real_features, fake_features)
    return {"probe_accuracy": probe_accuracy(real_features, fake_features, seed),
            "precision": precision, "recall": recall, "samples": len(real)}


# ---- training -----------------------------------------------------------------------------------------------

class Trainer:
    """Everything a training step reads and changes; its state_dict is what --resume restores bit for bit."""

    def __init__(self, settings, images):
        self.s = settings
        self.device = torch.device(settings.device)
        self.images = images
        torch.manual_seed(settings.seed)
        channels = images.shape[1]
        self.G = DCGANGenerator(settings.z_dim, generator_widths(settings.size, settings.width), channels).to(self.device)
        self.D = Discriminator(settings.size, channels, settings.d_width).to(self.device)
        self.G_ema = copy.deepcopy(self.G).requires_grad_(False)
        betas = (settings.beta1, settings.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=settings.lr, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=settings.lr, betas=betas)
        self.rng = torch.Generator().manual_seed(settings.seed)   # batches, latents and shifts; on the CPU
        self.step = 0
        self.d_loss, self.g_loss = losses(settings.loss)

    def augment(self, x):
        return translate(x, self.rng) if self.s.augment else x

    def latents(self, n):
        return torch.randn(n, self.s.z_dim, generator=self.rng).to(self.device)

    def train_step(self):
        """One discriminator and one generator update; returns (discriminator loss, generator loss, real-minus-fake
        score margin)."""
        b = self.s.batch_size
        real = to_unit_range(self.images[torch.randint(len(self.images), (b,), generator=self.rng)]).to(self.device)
        self.G.train()
        with torch.no_grad():
            fake = self.G(self.latents(b))
        real_scores, fake_scores = self.D(self.augment(real)), self.D(self.augment(fake))
        d_loss = self.d_loss(real_scores, fake_scores)
        self.opt_D.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_D.step()

        self.D.requires_grad_(False)
        g_loss = self.g_loss(self.D(self.augment(self.G(self.latents(b)))))
        self.opt_G.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_G.step()
        self.D.requires_grad_(True)

        self.step += 1
        update_ema(self.G_ema, self.G, min(self.s.ema, (1 + self.step) / (10 + self.step)))
        return d_loss.item(), g_loss.item(), (real_scores.mean() - fake_scores.mean()).item()

    def output_generator(self):
        """The generator that gets written: the EMA one with its own BatchNorm statistics, on the CPU."""
        return with_standing_statistics(self.G_ema, self.s.seed + 1, self.s.batch_size, self.device).cpu()

    def state_dict(self):
        return {"format": CHECKPOINT_FORMAT, "step": self.step,
                "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
                "rng": self.rng.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}

    def load_state_dict(self, state):
        self.step = state["step"]
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def atomic_write(path, write):
    """write(temporary path), then renamed to `path`, so `path` is whole or untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_bytes(path, data):
    with open(path, "wb") as file:
        file.write(data)


def save_grid(path, images):
    """images [N, C, R, R] in [-1, 1] as one PNG, GRID_SIDE images a row, 2 px gaps."""
    n, c, r, _ = images.shape
    rows = -(-n // GRID_SIDE)
    grid = torch.ones(c, rows * (r + 2) + 2, GRID_SIDE * (r + 2) + 2)
    for i, image in enumerate(images.cpu().float().clamp(-1, 1)):
        top, left = 2 + (i // GRID_SIDE) * (r + 2), 2 + (i % GRID_SIDE) * (r + 2)
        grid[:, top:top + r, left:left + r] = image
    array = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if c == 1 else array)
    atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))


def save_generator(path, G):
    """G's state in the layout load_dcgan_checkpoint reads (-gen dcgan -GPath, and -gen auto)."""
    buffer = io.BytesIO()
    torch.save({CHECKPOINT_KEY: G.state_dict()}, buffer)
    atomic_write(path, lambda temporary: write_bytes(temporary, buffer.getvalue()))


def read_checkpoint(path, expected_fingerprint):
    if not os.path.isfile(path):
        raise UserError(f"--resume, but there is no checkpoint at {path}; drop --resume to start a new run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}); use --force to start over") \
            from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of pretrain_generator.py; use --force to start over")
    if checkpoint["fingerprint"] != expected_fingerprint:
        ours, theirs = json.loads(expected_fingerprint), json.loads(checkpoint["fingerprint"])
        differ = sorted(k for k in ours if ours.get(k) != theirs.get(k))
        raise UserError(f"{path} was written by another run (different {', '.join(differ)}); resume with that run's "
                        f"flags and data, or use another --out or --force to start over")
    return checkpoint


def pretrain(settings, progress=True):
    """Trains (or, with settings.resume, continues) a generator as `settings` say and writes its files (see the
    module's docstring); returns {'seconds', 'steps', 'history' (per-step (d loss, g loss, margin)), 'quality'}."""
    check_settings(settings)
    paths = output_paths(settings.out)
    if not settings.resume and not settings.force:
        taken = [paths[k] for k in ("generator", "checkpoint") if os.path.exists(paths[k])]
        if taken:
            raise UserError(f"{taken[0]} exists; pass --resume to continue that run or --force to overwrite it")
    images = load_images(settings.images, settings.size)
    run_fingerprint = fingerprint(settings, images)
    trainer = Trainer(settings, images)
    seconds_before = 0.0
    if settings.resume:
        checkpoint = read_checkpoint(paths["checkpoint"], run_fingerprint)
        trainer.load_state_dict(checkpoint["trainer"])
        seconds_before = checkpoint["seconds"]
    else:
        # Grids of an earlier run in this place would read as this one's.
        for stale in glob.glob(os.path.join(glob.escape(paths["samples"]), "step_*.png")):
            os.remove(stale)
    fixed = torch.randn(GRID_SIDE ** 2, settings.z_dim, generator=torch.Generator().manual_seed(settings.seed + 2))
    started = time.perf_counter()

    def seconds():
        return seconds_before + time.perf_counter() - started

    def write_checkpoint():
        state = {"format": CHECKPOINT_FORMAT, "fingerprint": run_fingerprint, "seconds": seconds(),
                 "settings": asdict(settings), "trainer": trainer.state_dict()}
        atomic_write(paths["checkpoint"], lambda temporary: torch.save(state, temporary))

    def write_samples():
        G = with_standing_statistics(trainer.G_ema, settings.seed + 1, settings.batch_size, trainer.device)
        with torch.no_grad():
            save_grid(os.path.join(paths["samples"], f"step_{trainer.step:06d}.png"), G(fixed.to(trainer.device)))

    history = []
    bar = tqdm(total=settings.steps, initial=min(trainer.step, settings.steps), disable=not progress,
               desc="pretrain", dynamic_ncols=True)
    while trainer.step < settings.steps:
        history.append(trainer.train_step())
        d, g, margin = history[-1]
        bar.update(1)
        bar.set_postfix_str(f"d={d:.3f} g={g:.3f} margin={margin:.3f} s={seconds():.0f}")
        if settings.sample_every and trainer.step % settings.sample_every == 0:
            write_samples()
        if settings.checkpoint_every and trainer.step % settings.checkpoint_every == 0:
            write_checkpoint()
    bar.close()
    write_checkpoint()
    if not settings.sample_every or trainer.step % settings.sample_every:
        write_samples()
    G = trainer.output_generator()
    save_generator(paths["generator"], G)

    # The written file, read back as -GPath reads it, against real images not drawn by training's RNG.
    written = load_dcgan_checkpoint(paths["generator"])
    rng = torch.Generator().manual_seed(settings.seed + 3)
    n = min(settings.quality_samples, len(images))
    real = to_unit_range(images[torch.randperm(len(images), generator=rng)[:n]])
    with torch.no_grad():
        fake = torch.cat([written(torch.randn(len(chunk), settings.z_dim, generator=rng))
                          for chunk in torch.arange(n).split(256)])
    quality = real_fake_scores(real, fake, seed=settings.seed)
    quality.update(steps=trainer.step, seconds=round(seconds(), 1))
    text = json.dumps(quality, indent=1)
    atomic_write(paths["quality"], lambda temporary: write_bytes(temporary, (text + "\n").encode()))
    return {"seconds": seconds(), "steps": trainer.step, "history": history, "quality": quality,
            "samples": os.path.join(paths["samples"], f"step_{trainer.step:06d}.png")}
