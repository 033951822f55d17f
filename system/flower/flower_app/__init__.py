"""FedKTL and every baseline on Flower: a ServerApp that drives any algorithm's server (flcore/servers) and a
ClientApp that runs the same clients (flcore/clients), through the one exchange contract (flcore/exchange.py)."""
