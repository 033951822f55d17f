"""Shared code of the federated dataset generation scripts in ``dataset/``."""
