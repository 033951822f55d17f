"""Generates a label-skewed federated dataset from Fashion-MNIST: 28x28 grayscale, 10 classes (see README.md)."""
import sys

from fldata.cli import run
from fldata.sources import FASHION_MNIST


def main(argv: list[str] | None = None) -> int:
    return run(FASHION_MNIST, argv)


if __name__ == "__main__":
    sys.exit(main())
