"""Converts an HtFLlib/PFLlib dataset folder (pickled per-client files) into this project's format (see README.md)."""
import sys

from fldata.reference import run


def main(argv: list[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
