#!/bin/sh
# The evidence of docs/results.md for FedKTL at CPU scale: does the knowledge transfer help its clients?
# Digits (10 clients) and the CIFAR-10 subset of ../shared/data (20 clients), Dirichlet(0.1), HtCPU4, seed 1,
# 3 runs of 30 rounds (60 for the ETF/margin study), one CPU thread per run; then the markdown tables.
# Usage: sh system/run_evidence.sh [digits|cifar|etf|transfer]...   (default: all four; transfer needs digits and
# cifar's runs for its tables). Runs from any working directory.
# Needs the face generator: pip install --no-deps gan-face-generate==1.1.1
set -e
cd "$(dirname "$0")"
PARTS=${*:-"digits cifar etf transfer"}
CIFAR_NPZ=${CIFAR_NPZ:-../../shared/data/cifar10/cifar10_10k_1000perclass_uint8.npz}
OUT=../results/evidence
DATA=../dataset/evidence  # its own folder, so a full CIFAR-10 in dataset/Cifar10 is left alone
python ../dataset/generate_Digits.py --num-clients 10 --out $DATA/Digits10
case " $PARTS " in *" cifar "*|*" transfer "*)
    python ../dataset/generate_Cifar10.py --root "$CIFAR_NPZ" --num-clients 20 --out $DATA/Cifar10 ;;
esac

run() {  # run DATA CLIENTS ROUNDS GOAL ALGO [flags...]
    data=$1; clients=$2; rounds=$3; goal=$4; algo=$5; shift 5
    python main.py -data "$data" -nb 10 -nc "$clients" -m HtCPU4 -algo "$algo" -gr "$rounds" -t 3 --seed 1 \
        -dev cpu --num_threads 1 --dataset_dir $DATA --results_dir "$OUT" -go "$goal" "$@"
}

transfer_configs() {  # the same configurations on each dataset
    data=$1; clients=$2
    run "$data" "$clients" 30 local Local
    run "$data" "$clients" 30 fedgh FedGH
    run "$data" "$clients" 30 feddistill FedDistill
    run "$data" "$clients" 30 ktl_dcgan_keep FedKTL-stylegan-3
    run "$data" "$clients" 30 ktl_dcgan_update FedKTL-stylegan-3 --kt_norm update
    run "$data" "$clients" 30 ktl_dcgan_aux FedKTL-stylegan-3 --kt_norm aux
    run "$data" "$clients" 30 ktl_dcgan_norescale FedKTL-stylegan-3 -lrs 0
    run "$data" "$clients" 30 ktl_untrained_keep FedKTL-stylegan-3 -gen untrained
    run "$data" "$clients" 30 ktl_untrained_update FedKTL-stylegan-3 -gen untrained --kt_norm update
    run "$data" "$clients" 30 ktl_mu0 FedKTL-stylegan-3 -mu 0
    python results_table.py --dataset "$data" --results_dir "$OUT" --out "$OUT/${data}_table.md" --goal local \
        fedgh feddistill ktl_dcgan_keep ktl_dcgan_update ktl_dcgan_aux ktl_dcgan_norescale ktl_untrained_keep \
        ktl_untrained_update ktl_mu0
}

for part in $PARTS; do
    case $part in
        digits) transfer_configs Digits10 10 ;;
        cifar) transfer_configs Cifar10 20 ;;
        etf)
            run Digits10 10 60 local_60 Local
            run Digits10 10 60 ktl_mu0_60 FedKTL-stylegan-3 -mu 0
            run Digits10 10 60 ktl_mu0_margin0_60 FedKTL-stylegan-3 -mu 0 -margin 0
            run Digits10 10 60 ktl_mu0_noclip_60 FedKTL-stylegan-3 -mu 0 --client_grad_clip 0
            for r in 10 30 60; do
                python results_table.py --dataset Digits10 --results_dir "$OUT" --rounds $r \
                    --out "$OUT/Digits10_etf_${r}_rounds.md" --goal local_60 ktl_mu0_60 ktl_mu0_margin0_60 \
                    ktl_mu0_noclip_60
            done ;;
        transfer)  # the transfer-task study: mu dose-response, the task's switches, its gradients (-kdiag)
            for spec in "Digits10 10" "Cifar10 20"; do
                set -- $spec
                run $1 $2 30 ktl_diag FedKTL-stylegan-3 --kt_diagnostics 1 -t 1
                run $1 $2 30 ktl_mu1 FedKTL-stylegan-3 -mu 1
                run $1 $2 30 ktl_margin0 FedKTL-stylegan-3 -margin 0
                run $1 $2 30 ktl_mu0_margin0 FedKTL-stylegan-3 -mu 0 -margin 0
                run $1 $2 30 ktl_ppc5 FedKTL-stylegan-3 --kt_pairs_per_class 5
            done
            for mu in 5 10; do run Digits10 10 30 ktl_mu$mu FedKTL-stylegan-3 -mu $mu; done
            for spec in "Digits10 10" "Cifar10 20"; do
                set -- $spec
                run $1 $2 30 ktl_kfn FedKTL-stylegan-3 -kfn 1
                run $1 $2 30 ktl_muwarm10 FedKTL-stylegan-3 --mu_warmup 10
            done
            run Digits10 10 30 ktl_nobasegrad FedKTL-stylegan-3 -kbg 0
            run Cifar10 20 30 ktl_nobasegrad FedKTL-stylegan-3 -kbg 0 -t 1
            for ablation in "etf0 -etf 0" "ft0 -ft 0" "mmd0 -mmd 0" "lam0 -lam 0" "cr0 -cr 0" "rp1 -rp 1"; do
                set -- $ablation
                goal=$1; shift
                run Digits10 10 30 ktl_$goal FedKTL-stylegan-3 "$@"
            done
            python results_table.py --dataset Digits10 --results_dir "$OUT" --tail 10 --rounds 30 \
                --out "$OUT/Digits10_transfer_table.md" --goal local ktl_mu0 ktl_mu1 ktl_mu5 ktl_mu10 ktl_dcgan_keep \
                ktl_margin0 ktl_mu0_margin0 ktl_ppc5 ktl_kfn ktl_muwarm10 ktl_nobasegrad ktl_etf0 ktl_ft0 ktl_mmd0 \
                ktl_lam0 ktl_cr0 ktl_rp1
            python results_table.py --dataset Cifar10 --results_dir "$OUT" --tail 10 \
                --out "$OUT/Cifar10_transfer_table.md" --goal local ktl_mu0 ktl_mu1 ktl_dcgan_keep ktl_margin0 \
                ktl_mu0_margin0 ktl_ppc5 ktl_kfn ktl_muwarm10 ktl_nobasegrad
            for data in Digits10 Cifar10; do
                python results_table.py --dataset $data --results_dir "$OUT" --goal ktl_diag ktl_nobasegrad \
                    --out "$OUT/${data}_transfer_diagnostics.md" --metrics grad_cosine@1 grad_cosine@10 grad_cosine@29 \
                    classification_grad_norm@1 classification_grad_norm@29 transfer_grad_norm@1 \
                    transfer_grad_norm@29 transfer_loss@1 transfer_loss@29 centroid_shift@1 centroid_shift@29 \
                    align_mmd@29 align_centroid@29 image_distance@29
            done ;;
        *) echo "error: unknown part '$part'; choose from digits, cifar, etf, transfer" >&2; exit 2 ;;
    esac
done
