"""Generates a label-skewed federated dataset from MNIST: 28x28 grayscale, 10 classes (see README.md)."""
import sys

from fldata.cli import run
from fldata.sources import MNIST


def main(argv: list[str] | None = None) -> int:
    return run(MNIST, argv)


if __name__ == "__main__":
    sys.exit(main())
