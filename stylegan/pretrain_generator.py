"""Pre-trains a DCGAN generator, unconditionally, on a folder of png/jpg images or an .npz (key 'x', uint8
[N, H, W] or [N, H, W, 3]) and writes it where FedKTL's -gen dcgan -GPath (and -gen auto) reads it:

    python stylegan/pretrain_generator.py --images DATA --out gen.pt --steps 3000 --size 32 -dev cpu

Next to --out: gen.pt.ckpt (for --resume), gen.pt.samples/step_<n>.png and gen.pt.quality.json. The training
itself is flcore/generators/pretrain.py; this file only reads the flags."""
import argparse
import sys

import torch

from flcore.errors import UserError
from flcore.generators.pretrain import LOSSES, SIZES, PretrainSettings, pretrain

DEFAULTS = PretrainSettings(images="", out="")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", required=True, help="a folder of png/jpg images (recursive) or an .npz")
    p.add_argument("--out", required=True, help="the generator file to write (a DCGAN checkpoint for -GPath)")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="total training steps, one D and one G update each (--resume continues up to it)")
    p.add_argument("--size", type=int, choices=SIZES, default=DEFAULTS.size, help="image side in pixels")
    p.add_argument("-dev", "--device", choices=("cpu", "cuda"), default=DEFAULTS.device)
    p.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--z_dim", type=int, default=DEFAULTS.z_dim, help="latent size")
    p.add_argument("--width", type=int, default=DEFAULTS.width, help="the generator's last block's channels")
    p.add_argument("--d_width", type=int, default=DEFAULTS.d_width, help="the discriminator's first block's channels")
    p.add_argument("--loss", choices=LOSSES, default=DEFAULTS.loss)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam's learning rate, both networks")
    p.add_argument("--beta1", type=float, default=DEFAULTS.beta1)
    p.add_argument("--beta2", type=float, default=DEFAULTS.beta2)
    p.add_argument("--ema", type=float, default=DEFAULTS.ema, help="decay of the written generator's weight average")
    p.add_argument("--no_augment", action="store_true", help="no random translation of the discriminator's inputs")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--sample_every", type=int, default=DEFAULTS.sample_every, help="steps between sample grids")
    p.add_argument("--checkpoint_every", type=int, default=DEFAULTS.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--quality_samples", type=int, default=DEFAULTS.quality_samples,
                   help="real and generated images the quality scores compare")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--force", action="store_true", help="start over, overwriting --out and its files")
    p.add_argument("--num_threads", type=int, default=0, help="torch's CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    settings = PretrainSettings(
        images=a.images, out=a.out, steps=a.steps, size=a.size, batch_size=a.batch_size, z_dim=a.z_dim,
        width=a.width, d_width=a.d_width, loss=a.loss, lr=a.lr, beta1=a.beta1, beta2=a.beta2, ema=a.ema,
        augment=not a.no_augment, seed=a.seed, device=a.device, sample_every=a.sample_every,
        checkpoint_every=a.checkpoint_every, quality_samples=a.quality_samples, resume=a.resume, force=a.force)
    try:
        result = pretrain(settings, progress=not a.quiet)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    q = result["quality"]
    print(f"wrote {a.out} after {result['steps']} steps ({result['seconds']:.0f} s); real-vs-generated linear probe "
          f"accuracy {q['probe_accuracy']:.3f} (0.5 = indistinguishable), k-NN precision {q['precision']:.3f}, "
          f"recall {q['recall']:.3f}; last samples: {result['samples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
