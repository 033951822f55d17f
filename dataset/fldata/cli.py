"""Command line shared by the ``generate_*.py`` scripts: options, up-to-date check, load, partition, write."""
import argparse
import os
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np

from fldata.dataset_io import (
    FORMAT_VERSION,
    check_output_dir,
    is_up_to_date,
    split_train_test,
    validate_train_ratio,
    write_dataset,
)
from fldata.errors import DatasetError
from fldata.partition import PARTITIONS, partition_indices, validate_partition_params
from fldata.sources import DatasetSpec, describe_source, load_source

# dataset/: the folder this package lives in, where generated datasets go by default.
DATASET_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class GenerationOptions:
    """One generation's settings; the defaults are the command line's defaults."""
    num_clients: int = 20
    partition: str = "dir"
    alpha: float = 0.1
    class_per_client: int = 2
    balance: bool = False
    train_ratio: float = 0.75
    seed: int = 1
    out: str | None = None
    root: str | None = None
    download: bool = False
    image_size: int | None = None  # None: the dataset's own size


class _UsageError(DatasetError):
    pass


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        """Raises instead of printing usage and exiting, so errors stay one line and main() returns."""
        raise _UsageError(message)


def parse_bool(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {text!r}")
    return value


def build_parser(spec: DatasetSpec) -> argparse.ArgumentParser:
    defaults = GenerationOptions()
    parser = OneLineErrorParser(prog=f"generate_{spec.name}.py",
                     description=f"Generate a label-skewed federated {spec.name} dataset "
                                 f"({spec.num_classes} classes, images {'x'.join(map(str, spec.image_shape))}).")
    parser.add_argument("--num-clients", type=int, default=defaults.num_clients, help="number of clients (%(default)s)")
    parser.add_argument("--partition", choices=PARTITIONS, default=defaults.partition,
                        help="iid, pat (pathological), dir (Dirichlet) or exdir (classes per client + Dirichlet) "
                             "(%(default)s)")
    parser.add_argument("--alpha", type=float, default=defaults.alpha,
                        help="Dirichlet concentration for dir/exdir, smaller is more skewed (%(default)s)")
    parser.add_argument("--class-per-client", type=int, default=defaults.class_per_client,
                        help="classes per client for pat/exdir (%(default)s)")
    parser.add_argument("--balance", type=parse_bool, default=defaults.balance,
                        help="equal client sizes for iid/pat: 0/1/true/false (%(default)s)")
    parser.add_argument("--train-ratio", type=float, default=defaults.train_ratio,
                        help="share of each client's samples used for training (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (%(default)s)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help=f"height and width of the written images (default: the dataset's own, "
                             f"{spec.image_shape[1]})")
    parser.add_argument("--out", default=defaults.out,
                        help=f"output folder (default: {os.path.join(DATASET_DIR, spec.name)})")
    if spec.read_native is not None:
        root_help = f"local copy: {spec.native_layout}, a folder of images per class, or a .npz with x, y"
    else:
        root_help = "images to use instead of the built-in ones: a folder of images per class, or a .npz with x, y"
    parser.add_argument("--root", default=defaults.root, help=root_help)
    if spec.read_native is not None:
        parser.add_argument("--download", action="store_true",
                            help="download the dataset (into --root, default <out>/rawdata)")
    return parser


def run(spec: DatasetSpec, argv: list[str] | None = None) -> int:
    """A script's main(): returns 0 on success, 2 after printing a one-line ``error: ...`` to stderr."""
    try:
        options = GenerationOptions(**vars(build_parser(spec).parse_args(argv)))
        generate(spec, options)
    except (DatasetError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


def generate(spec: DatasetSpec, options: GenerationOptions) -> bool:
    """Writes the federated dataset; returns False if the output already matched ``options``."""
    validate_partition_params(options.num_clients, spec.num_classes, options.partition,
                              options.class_per_client, options.alpha)
    validate_train_ratio(options.train_ratio)
    if options.seed < 0:
        raise DatasetError(f"--seed must be >= 0, got {options.seed}")
    if options.image_size is not None:
        if not 8 <= options.image_size <= 512:
            raise DatasetError(f"--image-size must be in [8, 512], got {options.image_size}")
        spec = replace(spec, image_shape=(spec.image_shape[0], options.image_size, options.image_size))
    out_dir = os.path.abspath(options.out or os.path.join(DATASET_DIR, spec.name))
    root = options.root or (os.path.join(out_dir, "rawdata") if options.download else None)
    params = {
        "format": FORMAT_VERSION,
        "dataset": spec.name,
        "source": describe_source(spec, root),
        "num_classes": spec.num_classes,
        "image_shape": list(spec.image_shape),
        **{key: value for key, value in asdict(options).items()
           if key not in ("out", "root", "download", "image_size")},
    }
    if is_up_to_date(out_dir, params):
        print(f"{out_dir} is up to date (same parameters); nothing to do")
        return False
    check_output_dir(out_dir)

    images, labels = load_source(spec, root, options.download)
    rng = np.random.default_rng(options.seed)
    client_indices = partition_indices(labels, options.num_clients, spec.num_classes, options.partition,
                                       options.balance, options.class_per_client, options.alpha, rng)
    splits = split_train_test(client_indices, options.train_ratio, rng)
    info = {key: params[key] for key in ("dataset", "num_clients", "num_classes", "partition", "alpha",
                                         "class_per_client", "balance", "train_ratio", "seed")}
    if spec.class_names is not None:
        info["class_names"] = list(spec.class_names)
    config = write_dataset(out_dir, images, labels, splits, {**info, "params": params})
    print(f"wrote {options.num_clients} clients ({sum(config['train_sizes'])} train / "
          f"{sum(config['test_sizes'])} test samples) to {out_dir}")
    return True
