"""Generates a label-skewed federated dataset from scikit-learn's 8x8 digits, upsampled to 32x32 RGB (see README.md)."""
import sys

from fldata.cli import run
from fldata.sources import DIGITS


def main(argv: list[str] | None = None) -> int:
    return run(DIGITS, argv)


if __name__ == "__main__":
    sys.exit(main())
