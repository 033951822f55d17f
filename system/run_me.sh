#!/bin/sh
# The paper's FedKTL runs (CVPR 2024, Tables 1-2): Cifar100, practical setting Dirichlet(0.1), 20 clients.
# Needs a GPU and the pretrained generators (see ../stylegan/*-models/README.md). Create the dataset first:
#   python ../dataset/generate_Cifar100.py --download --num-clients 20 --partition dir --alpha 0.1
# Paths are resolved from this script's folder, so it runs from anywhere.
set -e
cd "$(dirname "$0")"

# StyleGAN-XL pre-trained on ImageNet 64x64 (the paper's default generator): lambda 1, mu 50, server lr 0.01.
python main.py -data Cifar100 -nb 100 -m HtFE8 -algo FedKTL-stylegan-xl -gr 1000 -nc 20 -jr 1 -lbs 10 -ls 1 \
    -lr 0.01 -fd 512 -slr 0.01 -sbs 100 -se 100 -lam 1 -mu 50 -gbs 4 -t 3 -eg 1 -dev cuda \
    -GPath ../stylegan/stylegan-xl-models/imagenet64.pkl

# The same with the heterogeneous family that includes ViTs (Table 2, HtM10).
python main.py -data Cifar100 -nb 100 -m HtM10 -algo FedKTL-stylegan-xl -gr 1000 -nc 20 -jr 1 -lbs 10 -ls 1 \
    -lr 0.01 -fd 512 -slr 0.01 -sbs 100 -se 100 -lam 1 -mu 50 -gbs 4 -t 3 -eg 1 -dev cuda \
    -GPath ../stylegan/stylegan-xl-models/imagenet64.pkl

# StyleGAN3 pre-trained on AFHQv2 (Table 6): lambda 0.1, mu 50, server lr 0.01.
python main.py -data Cifar100 -nb 100 -m HtFE8 -algo FedKTL-stylegan-3 -gr 1000 -nc 20 -jr 1 -lbs 10 -ls 1 \
    -lr 0.01 -fd 512 -slr 0.01 -sbs 100 -se 100 -lam 0.1 -mu 50 -gbs 4 -t 3 -eg 1 -dev cuda \
    -GPath ../stylegan/stylegan-3-models/stylegan3-t-afhqv2-512x512.pkl

# The floor every method is compared with: each client trains alone.
python main.py -data Cifar100 -nb 100 -m HtFE8 -algo Local -gr 1000 -nc 20 -jr 1 -lbs 10 -ls 1 -lr 0.01 \
    -fd 512 -t 3 -eg 1 -dev cuda
