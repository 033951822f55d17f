#!/bin/sh
# The paper's runs (CVPR 2024): Cifar100, practical setting Dirichlet(0.1), 20 clients, 3 runs each.
# Needs a GPU and the pretrained generators (see ../stylegan/*-models/README.md and
# ../stable-diffusion/v1.5/README.md). Create the dataset first:
#   python ../dataset/generate_Cifar100.py --download --num-clients 20 --partition dir --alpha 0.1
# Paths are resolved from this script's folder, so it runs from anywhere.
set -e
cd "$(dirname "$0")"

COMMON="-data Cifar100 -nb 100 -gr 1000 -nc 20 -jr 1 -lbs 10 -ls 1 -lr 0.01 -fd 512 -t 3 -eg 1 -dev cuda"
KTL="-sbs 100 -se 100 -gbs 4"

# FedKTL, StyleGAN-XL pre-trained on ImageNet 64x64 (the paper's default): lambda 1, mu 50, server lr 0.01.
for family in HtFE8 HtM10; do
    python main.py $COMMON -m $family -algo FedKTL-stylegan-xl $KTL -slr 0.01 -lam 1 -mu 50 \
        -GPath ../stylegan/stylegan-xl-models/imagenet64.pkl
done

# FedKTL, StyleGAN3 pre-trained on AFHQv2: lambda 0.1, mu 50, server lr 0.01.
python main.py $COMMON -m HtM10 -algo FedKTL-stylegan-3 $KTL -slr 0.01 -lam 0.1 -mu 50 \
    -GPath ../stylegan/stylegan-3-models/stylegan3-t-afhqv2-512x512.pkl

# FedKTL, Stable Diffusion v1.5: lambda 0.01, mu 100, server lr 0.1, prompt "a cat".
python main.py $COMMON -m HtM10 -algo FedKTL-stable-diffusion $KTL -slr 0.1 -lam 0.01 -mu 100 \
    -GPath ../stable-diffusion/v1.5 -prompt "a cat"

# The other generator-based systems (README "Algorithms"), on the same partitions. Both average one architecture:
# ResNet-18 (FedFTG's paper; HtFE8's fourth model). FedFTG with its paper's settings (I 10, I_g 1, I_d 5, noise 256
# for 100 classes, generator Adam lr 0.01, global lr = -lr). FGL with Stable Diffusion v1.5 (the paper used v2.1-base),
# class-level prompts, 2,000 images per class rendered at 256x256, 120 server epochs, then FedAvg; the paper's
# 5-round numbers are the evaluations up to round 5 of this run.
python main.py $COMMON -m resnet18 -algo FedFTG
python main.py $COMMON -m resnet18 -algo FGL -GPath ../stable-diffusion/v1.5 --sd_resolution 256 -gbs 16

# Baselines (Table 1), with their defaults (README "Algorithms").
for algo in Local FedDistill FML LG-FedAvg FedGen FedProto FedKD FedGH FedTGP; do
    python main.py $COMMON -m HtFE8 -algo $algo
done
