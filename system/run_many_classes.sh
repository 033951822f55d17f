#!/bin/sh
# Why does FedKTL fall behind Local on many classes? One run per configuration on the Tiny-ImageNet subset of
# ../shared/data (200 classes, 32 px, 20 clients, Dirichlet(0.1), dataset seed 1), HtCPU4, one CPU thread per run.
# Every run keeps its last checkpoint, which benchmarks/per_class_accuracy.py reads (per-class accuracy against the
# client's label counts, and the post-hoc logit adjustment).
# Usage: sh system/run_many_classes.sh [--seed S] [--rounds R] CONFIG...   (defaults: seed 0, 20 rounds)
#   CONFIG: local (Local), ktl (FedKTL, shipped defaults), mu0 (-mu 0), margin0 (-margin 0), etf0 (-etf 0),
#           scale16 (--etf_scale 16), adjust (--logit_adjust 1)
# Writes results/many_classes/TinyImagenet32_<algo>_<config>_s<S>_r<R>* and results/many_classes/checkpoints/.
set -e
cd "$(dirname "$0")"
SEED=0; ROUNDS=20; CONFIGS=""
while [ $# -gt 0 ]; do
    case $1 in
        --seed) SEED=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        local|ktl|mu0|margin0|etf0|scale16|adjust) CONFIGS="$CONFIGS $1"; shift ;;
        *) echo "error: unknown argument '$1'; use --seed S, --rounds R or local|ktl|mu0|margin0|etf0|scale16|adjust" >&2
           exit 2 ;;
    esac
done
[ -n "$CONFIGS" ] || { echo "error: name at least one CONFIG, e.g. sh system/run_many_classes.sh local ktl" >&2; exit 2; }
TINY_NPZ=${TINY_NPZ:-../../shared/data/tiny_imagenet/tiny_imagenet32_train_150perclass.npz}
DATA=../dataset/evidence
OUT=../results/many_classes
[ -f $DATA/TinyImagenet32/config.json ] || python ../dataset/generate_TinyImagenet.py --root "$TINY_NPZ" \
    --image-size 32 --num-clients 20 --out $DATA/TinyImagenet32

for config in $CONFIGS; do
    case $config in
        local) algo=Local; flags="" ;;
        ktl) algo=FedKTL-stylegan-3; flags="" ;;
        mu0) algo=FedKTL-stylegan-3; flags="-mu 0" ;;
        margin0) algo=FedKTL-stylegan-3; flags="-margin 0" ;;
        etf0) algo=FedKTL-stylegan-3; flags="-etf 0" ;;
        scale16) algo=FedKTL-stylegan-3; flags="--etf_scale 16" ;;
        adjust) algo=FedKTL-stylegan-3; flags="--logit_adjust 1" ;;
    esac
    # shellcheck disable=SC2086  # flags split into words on purpose
    python main.py -data TinyImagenet32 -nb 200 -nc 20 -m HtCPU4 -algo $algo -gr "$ROUNDS" -t 1 --seed "$SEED" \
        -dev cpu --num_threads 1 --dataset_dir $DATA --results_dir $OUT -go "${config}_s${SEED}_r${ROUNDS}" \
        -sfn $OUT/checkpoints --image_every 10 $flags
done
