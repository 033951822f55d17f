#!/bin/sh
# Every algorithm on a CPU-sized configuration: Digits (scikit-learn's copy, no download), 10 clients,
# Dirichlet(0.1), the HtCPU4 family, 3 runs of 10 rounds each, one CPU thread per run; then a markdown table of the results.
# Usage: sh system/run_small.sh [algorithm ...]   (default: all). Runs from any working directory.
set -e
cd "$(dirname "$0")"
# FedFTG and FGL average one architecture, so they run the family's first model (-m tiny_cnn) for all clients;
# FGL renders its training set with a tiny random-weight Stable Diffusion (written once to ../results/), so its
# accuracy means nothing and its row is there for the cost.
ALGOS=${*:-"Local FedDistill FML LG-FedAvg FedGen FedProto FedKD FedGH FedTGP FedMRL FedL2G-feat FedL2G-logit FedKTL-stylegan-3 FedFTG FGL"}
TINY_SD=../results/tiny_sd_pipeline
python ../dataset/generate_Digits.py --num-clients 10 --out ../dataset/Digits10
for algo in $ALGOS; do
    case $algo in
        FedFTG) EXTRA="-m tiny_cnn --ftg_generator_width 32" ;;
        FGL) [ -f "$TINY_SD/model_index.json" ] || python ../stable-diffusion/sd_pipelines/tiny.py "$TINY_SD"
             EXTRA="-m tiny_cnn -GPath $TINY_SD --sd_steps 5 -gbs 20 --fgl_images_per_class 100 --fgl_server_epochs 20" ;;
        *) EXTRA="" ;;
    esac
    python main.py -data Digits10 -nb 10 -nc 10 -m HtCPU4 -algo "$algo" -gr 10 -t 3 -lbs 10 -lr 0.01 \
        -fd 512 -dev cpu -go small --image_every 0 --num_threads 1 $EXTRA
done
python results_table.py --dataset Digits10 --goal small --out ../results/Digits10_small_table.md
