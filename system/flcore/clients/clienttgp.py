"""FedTGP client (Zhang et al., AAAI 2024): trains and predicts exactly as FedProto's client (cross-entropy plus
lamda * MSE to the global prototype of the label; nearest global prototype at inference); only the server
differs."""
from flcore.clients.clientproto import ClientFedProto


class ClientFedTGP(ClientFedProto):
    uploads_counts = False  # FedTGP trains on the means; it does not weight them
