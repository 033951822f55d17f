"""Diffusers pipelines used as FedKTL's server-side generator."""
