"""Local: every client trains its own model alone, nothing is exchanged. The floor for every method."""
from flcore.servers.serverbase import Server


class ServerLocal(Server):
    pass
