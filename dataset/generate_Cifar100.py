"""Generates a label-skewed federated dataset from CIFAR-100: 32x32 RGB, 100 classes (see README.md)."""
import sys

from fldata.cli import run
from fldata.sources import CIFAR100


def main(argv: list[str] | None = None) -> int:
    return run(CIFAR100, argv)


if __name__ == "__main__":
    sys.exit(main())
