#!/bin/sh
# Does the content of FedKTL's generated images matter? FedKTL with three generators (untrained random weights, the
# face DCGAN, the natural-image DCGAN trained on Tiny-ImageNet) beside Local, FedGH and FedKTL without the transfer
# task (-mu 0), at the shipped defaults (10 rounds), 3 runs per seed base, on Digits (10 clients) and the CIFAR-10
# subset of ../shared/data (20 clients), both Dirichlet(0.1) with dataset seed 1, HtCPU4, one CPU thread per run.
# Usage: sh system/run_generator_study.sh [digits|cifar]... [--seed S]...   (default: both datasets, seeds 0 and 1)
# Writes results/generator_study/<dataset>_seed<S>_table.md and each FedKTL run's image grids.
# Needs the face generator: pip install --no-deps gan-face-generate==1.1.1
set -e
cd "$(dirname "$0")"
PARTS=""; SEEDS=""
while [ $# -gt 0 ]; do
    case $1 in
        --seed) SEEDS="$SEEDS $2"; shift 2 ;;
        digits|cifar) PARTS="$PARTS $1"; shift ;;
        *) echo "error: unknown argument '$1'; use digits, cifar or --seed S" >&2; exit 2 ;;
    esac
done
PARTS=${PARTS:-"digits cifar"}; SEEDS=${SEEDS:-"0 1"}
CIFAR_NPZ=${CIFAR_NPZ:-../../shared/data/cifar10/cifar10_10k_1000perclass_uint8.npz}
OUT=../results/generator_study
DATA=../dataset/evidence  # the same datasets as run_evidence.sh
for part in $PARTS; do
    case $part in
        digits) [ -f $DATA/Digits10/config.json ] || python ../dataset/generate_Digits.py --num-clients 10 --out $DATA/Digits10 ;;
        cifar) [ -f $DATA/Cifar10/config.json ] || python ../dataset/generate_Cifar10.py --root "$CIFAR_NPZ" --num-clients 20 --out $DATA/Cifar10 ;;
    esac
done

for seed in $SEEDS; do
    for part in $PARTS; do
        case $part in digits) data=Digits10; clients=10 ;; cifar) data=Cifar10; clients=20 ;; esac
        run() {  # run GOAL ALGO [flags...]
            goal=$1; algo=$2; shift 2
            python main.py -data $data -nb 10 -nc $clients -m HtCPU4 -algo "$algo" -t 3 --seed "$seed" -dev cpu \
                --num_threads 1 --dataset_dir $DATA --results_dir $OUT -go "${goal}_s$seed" --image_every 5 "$@"
        }
        run local Local
        run fedgh FedGH
        run ktl_untrained FedKTL-stylegan-3 -gen untrained
        run ktl_face FedKTL-stylegan-3 -gen face-dcgan
        run ktl_natural FedKTL-stylegan-3 -gen tiny-imagenet
        run ktl_mu0 FedKTL-stylegan-3 -mu 0
        python results_table.py --dataset $data --results_dir $OUT --tail 5 --out "$OUT/${data}_seed${seed}_table.md" \
            --goal local_s$seed fedgh_s$seed ktl_untrained_s$seed ktl_face_s$seed \
            ktl_natural_s$seed ktl_mu0_s$seed
    done
done
