"""FedKD (Wu et al., Nature Communications 2022): the server keeps the shared mentee. Clients upload their mentee
updates as truncated SVD factors; the server averages them, compresses the average the same way, applies it and
sends it back. The kept energy grows over rounds from T_start to T_end, as the paper schedules it."""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flcore.clients.clientkd import ClientFedKD, shared_state
from flcore.errors import UserError
from flcore.exchange import Payload, flatten, unflatten
from flcore.servers.serverbase import Server
from flcore.settings import Settings, option, raise_first_failed
from flcore.svd import svd_compress, svd_decompress
from flcore.trainmodel import build_model, model_with_state


@dataclass(frozen=True)
class FedKDSettings(Settings):
    title = "FedKD"
    mentee_learning_rate: float = option(0.01, "-mlr", "--mentee_learning_rate",
                                         help="FedKD: learning rate of the shared mentee (the reference library)")
    T_start: float = option(0.95, "-Ts", "--T_start",
                            help="FedKD: SVD energy kept in the first round (the reference library)")
    T_end: float = option(0.98, "-Te", "--T_end", help="FedKD: SVD energy kept at the end (the reference library)")
    mentee_model: str = option("cnn4", "--mentee_model", help="FedKD: registry name of the shared mentee, built at -fd")

    def validate(self):
        raise_first_failed([
            (0 < self.T_start <= self.T_end <= 1,
             f"FedKD needs 0 < -Ts <= -Te <= 1, got -Ts {self.T_start} -Te {self.T_end}"),
            (self.mentee_learning_rate > 0, f"-mlr must be > 0, got {self.mentee_learning_rate}"),
        ])


class ServerFedKD(Server):
    Settings = FedKDSettings
    phases = ("eval", "train", "aggregate")

    def prepare(self):
        settings = self.settings
        channels, height, _ = self.context.image_shape
        try:
            self.mentee = build_model(settings.mentee_model, self.num_classes, self.context.feature_dim, channels,
                                      height)
        except ValueError as exc:
            raise UserError(f"--mentee_model: {exc}") from None
        self.mentee.to(self.device)
        # Version of the global mentee, and the version each client holds (absent: none): clients one version behind
        # get the last update, others the whole mentee.
        self.version = 0
        self.synced_versions = {}
        self.last_update = None
        tqdm.write(f"FedKD: mentee {settings.mentee_model}, mentee lr {settings.mentee_learning_rate}, "
                   f"energy {settings.T_start} -> {settings.T_end}")

    def client_spec(self):
        """The mentee's architecture and its one initial state, and the first round's energy."""
        channels, height, _ = self.context.image_shape
        return Payload(flatten(self.mentee.state_dict(), "mentee"),
                       {"mentee_model": self.settings.mentee_model, "feature_dim": self.context.feature_dim,
                        "channels": channels, "height": height,
                        "mentee_learning_rate": self.settings.mentee_learning_rate, "energy": self.energy()})

    @classmethod
    def new_client(cls, setup, spec):
        c = spec.config
        mentee = model_with_state(c["mentee_model"], setup.num_classes, c["feature_dim"], c["channels"], c["height"],
                                  unflatten(spec.tensors, "mentee"))
        return ClientFedKD(setup, mentee=mentee, feature_dim=c["feature_dim"],
                           mentee_learning_rate=c["mentee_learning_rate"], energy=c["energy"])

    def energy(self):
        """T_start + (T_end - T_start) * round / global_rounds."""
        progress = self.round / max(self.context.global_rounds, 1)
        return self.settings.T_start + (self.settings.T_end - self.settings.T_start) * progress

    def payload_for(self, client_id):
        """The round's energy; with it nothing more to a client holding the current mentee, the last update to one
        a version behind, else the whole mentee."""
        payload = Payload(config={"energy": self.energy()})
        synced = self.synced_versions.get(client_id)
        if synced == self.version:
            return payload
        if synced == self.version - 1 and self.last_update is not None:
            payload.tensors.update(flatten(self.last_update, "update"))
        else:
            payload.tensors.update(flatten(shared_state(self.mentee), "full"))
        self.synced_versions[client_id] = self.version
        return payload

    def forget(self, client_id):
        self.synced_versions.pop(client_id, None)

    def aggregate(self, uploads, timer):
        energy = self.energy()
        self.round_metrics = {"svd_energy": energy}
        if not uploads:
            tqdm.write(f"round {self.round}: no uploads arrived; keeping the mentee")
            return {}
        deltas = [unflatten(upload.tensors, "delta") for upload in uploads.values()]
        with timer("aggregate"):
            state = shared_state(self.mentee)
            average = {name: torch.stack([svd_decompress(d[name], t.shape).to(self.device) for d in deltas]).mean(0)
                       for name, t in state.items()}
            self.last_update = {name: svd_compress(delta, energy) for name, delta in average.items()}
            with torch.no_grad():
                for name, t in state.items():
                    t.add_(svd_decompress(self.last_update[name], t.shape))
        self.version += 1
        update = Payload(flatten(self.last_update, "update"), {"energy": energy})
        for client_id in uploads:
            self.synced_versions[client_id] = self.version
        return dict.fromkeys(uploads, update)

    def state_dict(self):
        return {"mentee": self.mentee.state_dict(), "version": self.version, "last_update": self.last_update,
                "synced_versions": dict(self.synced_versions)}

    def load_state_dict(self, state):
        self.mentee.load_state_dict(state["mentee"])
        self.version = state["version"]
        self.synced_versions = dict(state["synced_versions"])
        update = state["last_update"]
        self.last_update = None if update is None else {
            name: {part: t.to(self.device) for part, t in packed.items()} for name, packed in update.items()}
