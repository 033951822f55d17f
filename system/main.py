"""Entry point: heterogeneous federated learning (FedKTL and baselines), clients simulated in one process.

With no flags it runs a small FedKTL experiment offline: Digits (built on the fly from scikit-learn's copy),
4 clients of the CPU-sized heterogeneous family, and the pre-trained face DCGAN. `python main.py -h` lists every
flag, grouped by algorithm. The code lives in the installed packages (docs/architecture.md).
"""
import sys

from flutils.experiment import main

if __name__ == "__main__":
    sys.exit(main())
