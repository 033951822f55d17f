#!/bin/sh
# Every algorithm on a CPU-sized configuration: Digits (scikit-learn's copy, no download), 10 clients,
# Dirichlet(0.1), the HtCPU4 family, 3 runs of 10 rounds each, one CPU thread per run; then a markdown table of the results.
# Usage: sh system/run_small.sh [algorithm ...]   (default: all). Runs from any working directory.
set -e
cd "$(dirname "$0")"
ALGOS=${*:-"Local FedDistill FML LG-FedAvg FedGen FedProto FedKD FedGH FedTGP FedKTL-stylegan-3"}
python ../dataset/generate_Digits.py --num-clients 10 --out ../dataset/Digits10
for algo in $ALGOS; do
    python main.py -data Digits10 -nb 10 -nc 10 -m HtCPU4 -algo "$algo" -gr 10 -t 3 -lbs 10 -lr 0.01 \
        -fd 512 -dev cpu -go small --image_every 0 --num_threads 1
done
python results_table.py --dataset Digits10 --goal small --out ../results/Digits10_small_table.md
