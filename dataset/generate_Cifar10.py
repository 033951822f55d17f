"""Generates a label-skewed federated dataset from CIFAR-10: 32x32 RGB, 10 classes (see README.md)."""
import sys

from fldata.cli import run
from fldata.sources import CIFAR10


def main(argv: list[str] | None = None) -> int:
    return run(CIFAR10, argv)


if __name__ == "__main__":
    sys.exit(main())
