"""FML (federated mutual learning, Shen et al. 2020): every client trains its private model together with a
shared "meme" model of one small architecture (--fml_model; by default the 4-layer CNN, the first model of
HtFE2/4/8 and HtM10, which the reference library uses); the server averages the meme models (FedAvg, weighted
by training samples) and sends the average back. Clients are evaluated with their private models.

Per round: upload = (meme parameters) per arrived client; download = (meme parameters) per selected client."""
from dataclasses import dataclass

from tqdm import tqdm

from flcore.clients.clientfml import ClientFML
from flcore.errors import UserError
from flcore.exchange import Payload, flatten, unflatten
from flcore.parameters import float_count, parameters_of, weighted_average
from flcore.servers.serverbase import Server
from flcore.settings import Settings, option, raise_first_failed
from flcore.trainmodel import build_model, model_with_state


@dataclass(frozen=True)
class FMLSettings(Settings):
    title = "FML"
    alpha: float = option(0.5, "-al", "--alpha",
                          help="FML: private model's loss = alpha * CE + (1 - alpha) * KL (the FML paper)")
    beta: float = option(0.5, "-bt", "--beta",
                         help="FML: shared model's loss = beta * CE + (1 - beta) * KL (the FML paper)")
    fml_model: str = option("cnn4", "--fml_model", help="FML: registry name of the shared model, built at -fd")

    def validate(self):
        raise_first_failed([(0 <= value <= 1, f"{flag} must be in [0, 1] for FML, got {value}")
                            for flag, value in (("-al", self.alpha), ("-bt", self.beta))])


class ServerFML(Server):
    Settings = FMLSettings

    def prepare(self):
        name = self.settings.fml_model
        channels, height, _ = self.context.image_shape
        try:
            # One initialization for every client's meme model, drawn from the server's seed.
            self.meme_template = build_model(name, self.num_classes, self.context.feature_dim, channels, height)
        except ValueError as exc:
            raise UserError(f"--fml_model: {exc}") from None
        self.global_meme = {k: v.to(self.device) for k, v in parameters_of(self.meme_template).items()}
        tqdm.write(f"FML: shared model {name} ({float_count(self.global_meme)} parameters), "
                   f"alpha {self.settings.alpha}, beta {self.settings.beta}")

    def client_spec(self):
        """The meme model's architecture and its one initial state (parameters and buffers), alpha and beta."""
        channels, height, _ = self.context.image_shape
        return Payload(flatten(self.meme_template.state_dict(), "meme"),
                       {"fml_model": self.settings.fml_model, "feature_dim": self.context.feature_dim,
                        "channels": channels, "height": height, "alpha": self.settings.alpha,
                        "beta": self.settings.beta})

    @classmethod
    def new_client(cls, setup, spec):
        c = spec.config
        meme = model_with_state(c["fml_model"], setup.num_classes, c["feature_dim"], c["channels"], c["height"],
                                unflatten(spec.tensors, "meme"))
        return ClientFML(setup, meme=meme, alpha=c["alpha"], beta=c["beta"])

    def payload_for(self, client_id):
        return Payload(flatten(self.global_meme, "meme"))

    def aggregate(self, uploads, timer):
        if uploads:
            memes = [unflatten(upload.tensors, "meme") for upload in uploads.values()]
            self.global_meme = weighted_average(memes, [upload.config["samples"] for upload in uploads.values()])
        return {}

    def state_dict(self):
        return {"global_meme": self.global_meme}

    def load_state_dict(self, state):
        self.global_meme = {k: v.to(self.device) for k, v in state["global_meme"].items()}
