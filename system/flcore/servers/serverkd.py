"""FedKD (Wu et al., Nature Communications 2022): the server keeps the shared mentee. Clients upload their mentee
updates as truncated SVD factors; the server averages them, compresses the average the same way, applies it and
sends it back. The kept energy grows over rounds from T_start to T_end, as the paper schedules it."""
import torch
from tqdm import tqdm

from flcore.clients.clientkd import ClientFedKD, shared_state
from flcore.servers.serverbase import Server
from flcore.svd import packed_floats, svd_compress, svd_decompress
from flcore.trainmodel import build_model
from flutils.errors import UserError
from flutils.options import raise_first_failed


class ServerFedKD(Server):
    phases = ("eval", "train", "aggregate")

    @classmethod
    def add_flags(cls, parser):
        group = parser.add_argument_group("FedKD")
        group.add_argument("-mlr", "--mentee_learning_rate", type=float, default=0.01,
                           help="FedKD: learning rate of the shared mentee (the reference library)")
        group.add_argument("-Ts", "--T_start", type=float, default=0.95,
                           help="FedKD: SVD energy kept in the first round (the reference library)")
        group.add_argument("-Te", "--T_end", type=float, default=0.98,
                           help="FedKD: SVD energy kept at the end (the reference library)")
        group.add_argument("--mentee_model", default="cnn4",
                           help="FedKD: registry name of the shared mentee, built at -fd")

    @classmethod
    def check_flags(cls, args):
        raise_first_failed([
            (0 < args.T_start <= args.T_end <= 1,
             f"FedKD needs 0 < -Ts <= -Te <= 1, got -Ts {args.T_start} -Te {args.T_end}"),
            (args.mentee_learning_rate > 0, f"-mlr must be > 0, got {args.mentee_learning_rate}"),
        ])

    def prepare(self):
        args = self.args
        channels, height, _ = self.dataset.image_shape
        try:
            self.mentee = build_model(args.mentee_model, self.num_classes, args.feature_dim, channels, height)
        except ValueError as exc:
            raise UserError(f"--mentee_model: {exc}") from None
        self.mentee.to(self.device)
        # Version of the global mentee: clients one version behind get the last update, others the whole mentee.
        self.version = 0
        self.last_update = None
        tqdm.write(f"FedKD: mentee {args.mentee_model}, mentee lr {args.mentee_learning_rate}, "
                   f"energy {args.T_start} -> {args.T_end}")

    def new_client(self, setup):
        return ClientFedKD(setup, mentee=self.mentee, feature_dim=self.args.feature_dim,
                           mentee_learning_rate=self.args.mentee_learning_rate)

    def energy(self):
        """T_start + (T_end - T_start) * round / global_rounds."""
        progress = self.round / max(self.args.global_rounds, 1)
        return self.args.T_start + (self.args.T_end - self.args.T_start) * progress

    def send_to(self, client):
        """Nothing to a client holding the current mentee; the last update to one a version behind; else the whole
        mentee."""
        if client.synced_version == self.version:
            return
        if client.synced_version == self.version - 1 and self.last_update is not None:
            self.send_update(client)
        else:
            state = shared_state(self.mentee)
            client.receive_full(state, self.version)
            self.download_floats += sum(t.numel() for t in state.values())

    def collect(self, client):
        return client.upload(self.energy())

    def server_round(self, uploads, timer):
        arrived = [self.clients[client_id] for client_id in uploads]
        uploads = list(uploads.values())
        energy = self.energy()
        self.round_metrics = {"svd_energy": energy}
        self.upload_floats += sum(packed_floats(update) for update in uploads)
        if not uploads:
            tqdm.write(f"round {self.round}: no uploads arrived; keeping the mentee")
            return
        with timer("aggregate"):
            state = shared_state(self.mentee)
            average = {name: torch.stack([svd_decompress(u[name], t.shape).to(self.device) for u in uploads]).mean(0)
                       for name, t in state.items()}
            self.last_update = {name: svd_compress(delta, energy) for name, delta in average.items()}
            with torch.no_grad():
                for name, t in state.items():
                    t.add_(svd_decompress(self.last_update[name], t.shape))
        self.version += 1
        for client in arrived:
            with self.store.loaded(client):
                self.send_update(client)

    def send_update(self, client):
        client.receive_update(self.last_update, self.version)
        self.download_floats += packed_floats(self.last_update)

    def extra_state(self):
        return {"mentee": self.mentee.state_dict(), "version": self.version, "last_update": self.last_update}

    def load_extra_state(self, state):
        self.mentee.load_state_dict(state["mentee"])
        self.version = state["version"]
        update = state["last_update"]
        self.last_update = None if update is None else {
            name: {part: t.to(self.device) for part, t in packed.items()} for name, packed in update.items()}
