"""Generates a label-skewed federated dataset from Tiny-ImageNet: 64x64 RGB, 200 classes (see README.md)."""
import sys

from fldata.cli import run
from fldata.sources import TINY_IMAGENET


def main(argv: list[str] | None = None) -> int:
    return run(TINY_IMAGENET, argv)


if __name__ == "__main__":
    sys.exit(main())
