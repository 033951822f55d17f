"""Image generators for FedKTL's server: the adapter contract (adapter.py) and the built-in face DCGAN."""
