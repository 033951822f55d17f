"""FML (federated mutual learning, Shen et al. 2020): every client trains its private model together with a
shared "meme" model of one small architecture (--fml_model; by default the 4-layer CNN, the first model of
HtFE2/4/8 and HtM10, which the reference library uses); the server averages the meme models (FedAvg, weighted
by training samples) and sends the average back. Clients are evaluated with their private models.

Per round: upload = (meme parameters) per arrived client; download = (meme parameters) per selected client."""
import copy

from tqdm import tqdm

from flcore.clients.clientfml import ClientFML
from flcore.clients.clientlg import float_count, parameters_of, weighted_average
from flcore.servers.serverbase import Server
from flcore.trainmodel import build_model
from flutils.errors import UserError


class ServerFML(Server):
    def prepare(self):
        for flag, value in (("-al", self.args.alpha), ("-bt", self.args.beta)):
            if not 0 <= value <= 1:
                raise UserError(f"{flag} must be in [0, 1] for FML, got {value}")
        name = self.args.fml_model
        channels, height, _ = self.dataset.image_shape
        try:
            # One initialization for every client's meme model, drawn from the server's seed.
            self.meme_template = build_model(name, self.num_classes, self.args.feature_dim, channels, height)
        except ValueError as exc:
            raise UserError(f"--fml_model: {exc}") from None
        self.global_meme = {k: v.to(self.device) for k, v in parameters_of(self.meme_template).items()}
        tqdm.write(f"FML: shared model {name} ({float_count(self.global_meme)} parameters), "
                   f"alpha {self.args.alpha}, beta {self.args.beta}")

    def make_client(self, client_id, model, data, seed, train_slow):
        return ClientFML(self.args, client_id, model, data, seed, self.device, train_slow,
                         meme=copy.deepcopy(self.meme_template), alpha=self.args.alpha, beta=self.args.beta)

    def send(self, selected):
        for client in selected:
            client.receive_meme(self.global_meme)
            self.download_floats += float_count(self.global_meme)

    def server_round(self, arrived, timer):
        memes = [parameters_of(client.meme) for client in arrived]
        self.upload_floats += sum(float_count(meme) for meme in memes)
        if memes:
            self.global_meme = weighted_average(memes, [client.num_train for client in arrived])

    def extra_state(self):
        return {"global_meme": self.global_meme}

    def load_extra_state(self, state):
        self.global_meme = {k: v.to(self.device) for k, v in state["global_meme"].items()}
