#!/bin/sh
# The paper's runs (CVPR 2024): Cifar100, practical setting Dirichlet(0.1), 20 clients, 3 runs each, one experiment
# file per table row family in configs/ (flags after --config override its keys; each run saves its resolved
# configuration beside its results, which `python main.py --config` reruns).
# Needs a GPU and the pretrained generators (see ../stylegan/*-models/README.md and
# ../stable-diffusion/v1.5/README.md). Create the dataset first:
#   python ../dataset/generate_Cifar100.py --download --num-clients 20 --partition dir --alpha 0.1
# Paths are resolved from this script's folder, so it runs from anywhere.
set -e
cd "$(dirname "$0")"

# FedKTL, StyleGAN-XL pre-trained on ImageNet 64x64 (the paper's default): lambda 1, mu 50, server lr 0.01.
for family in HtFE8 HtM10; do
    python main.py --config configs/fedktl_stylegan_xl.toml -m $family
done

# FedKTL with StyleGAN3 (AFHQv2) and with Stable Diffusion v1.5 (the generator ablation).
python main.py --config configs/fedktl_stylegan_3.toml
python main.py --config configs/fedktl_stable_diffusion.toml

# The other generator-based systems (README "Algorithms"), averaging ResNet-18.
python main.py --config configs/fedftg.toml
python main.py --config configs/fgl.toml

# Baselines (Table 1), with their defaults (README "Algorithms").
for algo in Local FedDistill FML LG-FedAvg FedGen FedProto FedKD FedGH FedTGP FedMRL FedL2G-feat FedL2G-logit; do
    python main.py --config configs/baselines.toml -algo $algo
done

# HtFLlib's heterogeneous heads (HtFE8 extractors with four head architectures): every algorithm that keeps a head
# per client (LG-FedAvg, FedGen and FedGH refuse this group).
for algo in Local FedDistill FML FedProto FedKD FedTGP FedMRL FedL2G-feat FedL2G-logit; do
    python main.py --config configs/baselines.toml -algo $algo -m HtFE8-HtC4
done
