"""Image generators for FedKTL (and FGL's Stable Diffusion): the registry (registry.py), what an entry is
(base.py), the entries (stylegan.py, dcgan.py, stable_diffusion.py), and pretrain.py, which trains a DCGAN
generator for -gen dcgan -GPath (stylegan/pretrain_generator.py)."""
