"""Command line of a sweep (flutils/sweep.py): main.py at every point of a product of grids, then one table.

    python system/sweep.py --config system/configs/digits_small.toml --grid local_learning_rate=0.01,0.05 \\
        --grid join_ratio=0.5,1 --times 3 --parallel 2 --out results/lr_sweep

`python system/sweep.py -h` lists the options."""
import sys

from flutils.sweep import main

if __name__ == "__main__":
    sys.exit(main())
