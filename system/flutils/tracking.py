"""--logger: a run's history sent to TensorBoard or W&B as it is recorded (flcore/history.py: Observer), with the
generated image grids the harness saves; the .h5, .json and .png are written either way (flutils/results.py)."""
import glob
import math
import numbers
import os

import numpy as np

from flcore.errors import UserError
from flcore.history import Observer

INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}
PROJECT = "FedKTL"  # the W&B project unless WANDB_PROJECT names one
IMAGE_TAG = "generated_images"


def check_logger(name):
    """Raises UserError, before anything is written, when the package --logger `name` needs is not installed."""
    try:
        if name == "tensorboard":
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        elif name == "wandb":
            import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"--logger {name} needs the {name} package: {INSTALL[name]} (or pass --logger none)") from None


def scalars(values):
    """The numbers of a history record by name; a per-client row becomes its min and max over the clients
    evaluated (<name>/min, <name>/max); the round index (eval_rounds) is the step, not a value."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            present = [v for v in value if not math.isnan(v)]
            if present:
                out[f"{key}/min"], out[f"{key}/max"] = min(present), max(present)
        elif isinstance(value, numbers.Real) and key != "eval_rounds":
            out[key] = float(value)
    return out


class Tracker(Observer):
    """--logger none: observes nothing. The others log each record at its round as the step."""

    def evaluation(self, round_index, values):
        self.log(round_index, scalars(values))

    def round(self, round_index, values):
        self.log(round_index, scalars(values))

    def log(self, step, values):
        """Sends {name: number} at `step`."""

    def image(self, round_index, path):
        """Sends the image grid saved at `path` (a PNG) for round `round_index`."""

    def close(self):
        """Flushes and ends the run's logging; again is a no-op."""


class TensorBoardTracker(Tracker):
    """One event file per run in `folder`; a run that starts over (no --resume) replaces the earlier one."""

    def __init__(self, folder, fresh):
        from torch.utils.tensorboard import SummaryWriter

        if fresh:
            for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
                os.remove(path)
        self.writer = SummaryWriter(log_dir=folder)

    def log(self, step, values):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, round_index, path):
        from PIL import Image

        with Image.open(path) as grid:
            pixels = np.asarray(grid.convert("RGB"))
        self.writer.add_image(IMAGE_TAG, pixels, round_index, dataformats="HWC")

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    """One W&B run per run (named like its .h5, grouped by experiment, the flags as its config), its files under
    `folder` unless WANDB_DIR says otherwise; WANDB_MODE=offline keeps it on disk for `wandb sync`."""

    def __init__(self, folder, name, group, config):
        import wandb

        self.wandb = wandb
        os.makedirs(folder, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=name, group=group,
                                  config=config, dir=os.environ.get("WANDB_DIR") or folder, reinit="create_new")
        except wandb.errors.Error as exc:  # no API key, no network
            wandb.teardown()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--logger wandb could not start a run ({reason}); run `wandb login`, or set "
                            f"WANDB_MODE=offline to log without a network") from None
        self.closed = False

    def log(self, step, values):
        self.run.log(values, step=step)

    def image(self, round_index, path):
        self.run.log({IMAGE_TAG: self.wandb.Image(path)}, step=round_index)

    def close(self):
        """Ends the run, then W&B's background service, so no process outlives the experiment."""
        if not self.closed:
            self.closed = True
            self.run.finish()
            self.wandb.teardown()


def open_tracker(config, name, group):
    """The --logger tracker of the run `name` (its .h5's stem) of the experiment `group`."""
    args = config.run
    if args.logger == "tensorboard":
        return TensorBoardTracker(os.path.join(args.results_dir, "tensorboard", name), fresh=not args.resume)
    if args.logger == "wandb":
        return WandbTracker(args.results_dir, name, group, config.values())
    return Tracker()
