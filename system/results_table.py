"""Markdown table of finished runs from their .h5 files: best accuracy (mean +- std over runs), upload and
download floats per round (the paper's Table 5), seconds per round and the rounds the scores cover; --plot draws
each algorithm's mean accuracy curve.

    python system/results_table.py --dataset Digits --goal small [--results_dir results] [--out table.md]
        [--plot curves.png]

Several goals (one configuration each) give one row per algorithm and goal; --rounds R scores each run by its
best evaluation up to round R (a 60-round run also answers for 10 and 30 rounds).
"""
import sys

from flutils.results_table import main

if __name__ == "__main__":
    sys.exit(main())
