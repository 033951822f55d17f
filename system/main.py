"""Entry point: heterogeneous federated learning (FedKTL and baselines), clients simulated in one process.

With no flags it runs a small FedKTL experiment offline: Digits (built on the fly from scikit-learn's copy),
4 clients of the CPU-sized heterogeneous family, and the pre-trained face DCGAN. `python main.py -h` lists every
flag, grouped by algorithm. The code lives in the installed packages (docs/architecture.md).
"""
import os
import sys

# OpenMP threads that wait by spinning starve each other when the cores are shared (a busy machine made a round 12x
# slower); waiting threads that sleep cost a few percent on an idle machine. Set before torch loads its OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flutils.experiment import main  # noqa: E402 (after the environment above)

if __name__ == "__main__":
    sys.exit(main())
