"""Image generators for FedKTL (and FGL's Stable Diffusion): the registry (registry.py), what an entry is
(base.py), and the entries (stylegan.py, dcgan.py, stable_diffusion.py)."""
