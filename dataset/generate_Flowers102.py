"""Generates a label-skewed federated dataset from Oxford Flowers-102, resized to 64x64 RGB (see README.md)."""
import sys

from fldata.cli import run
from fldata.sources import FLOWERS102


def main(argv: list[str] | None = None) -> int:
    return run(FLOWERS102, argv)


if __name__ == "__main__":
    sys.exit(main())
