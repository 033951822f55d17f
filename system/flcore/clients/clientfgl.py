"""FGL client: until the first global model arrives it trains nothing and uploads the token ids of the class-level
prompts of the classes it holds; from then on it is a FedAvg client on its real data."""
from flcore.clients.clientfedavg import ClientFedAvg
from flcore.fgl_ops import prompt_upload


class ClientFGL(ClientFedAvg):
    def __init__(self, setup, class_tokens):
        super().__init__(setup)
        self.class_tokens = class_tokens  # [K, L] token ids of every class's prompt (public: names and tokenizer)
        self.has_global = False

    def receive(self, payload):
        super().receive(payload)
        self.has_global = True

    def train(self):
        if self.has_global:
            super().train()

    def upload(self):
        if not self.has_global:
            return prompt_upload(self.label_counts, self.class_tokens)
        payload = super().upload()
        del payload.tensors["label_counts"]
        return payload

    def state_dict(self):
        return {**super().state_dict(), "has_global": self.has_global}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.has_global = state["has_global"]
