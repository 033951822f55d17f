"""FedMRL (Yi et al., "Federated Model Heterogeneous Matryoshka Representation Learning", NeurIPS 2024): every
client trains its private model together with one shared small homogeneous model (--mrl_model, by default the
4-layer CNN, whose representation has d1 = -sfd dimensions) and a private representation projector
(flcore/clients/clientmrl.py); the server averages the shared models (FedAvg, weighted by training samples, as the
paper aggregates) and sends the average back.

Per round: upload = (shared model's parameters) per arrived client; download = (shared model's parameters) per
selected client."""
from dataclasses import dataclass

from tqdm import tqdm

from flcore.clients.clientmrl import ClientFedMRL
from flcore.errors import UserError
from flcore.exchange import Payload, flatten, unflatten
from flcore.parameters import float_count, parameters_of, weighted_average
from flcore.servers.serverbase import Server
from flcore.settings import Settings, option, raise_first_failed
from flcore.trainmodel import build_model, list_models, model_with_state


@dataclass(frozen=True)
class FedMRLSettings(Settings):
    title = "FedMRL"
    mrl_model: str = option("cnn4", "--mrl_model",
                            help="FedMRL: registry name of the shared small model, built with d1 (-sfd) features "
                                 "(the 4-layer CNN, the reference library's first model of HtFE2/4/8)")
    sub_feature_dim: int = option(128, "-sfd", "--sub_feature_dim",
                                  help="FedMRL: d1, the shared model's representation size and the nested "
                                       "(Matryoshka) slice its header reads, at most -fd (128: the reference "
                                       "library's default; the paper tunes it)")
    mrl_global_weight: float = option(1.0, "--mrl_global_weight",
                                      help="FedMRL: weight of the shared header's loss (1: both losses summed, as "
                                           "the reference library does)")
    mrl_local_weight: float = option(1.0, "--mrl_local_weight",
                                     help="FedMRL: weight of the private header's loss (1, as the shared one's)")
    mrl_average: str = option("samples", "--mrl_average", choices=("samples", "uniform"),
                              help="FedMRL: average the shared models weighted by training samples (FedAvg, the "
                                   "paper) or uniformly (the reference library)")

    def validate(self):
        raise_first_failed([
            (self.sub_feature_dim >= 1, f"-sfd must be >= 1 for FedMRL, got {self.sub_feature_dim}"),
            (self.mrl_model in list_models(),
             f"--mrl_model: unknown model '{self.mrl_model}'; choose from: {', '.join(list_models())}"),
            (self.mrl_global_weight >= 0,
             f"--mrl_global_weight must be >= 0 for FedMRL, got {self.mrl_global_weight}"),
            (self.mrl_local_weight >= 0, f"--mrl_local_weight must be >= 0 for FedMRL, got {self.mrl_local_weight}"),
            (self.mrl_global_weight + self.mrl_local_weight > 0,
             "FedMRL needs --mrl_global_weight or --mrl_local_weight > 0, got both 0"),
        ])


class ServerFedMRL(Server):
    Settings = FedMRLSettings

    @classmethod
    def check_run(cls, settings, run):
        if settings.sub_feature_dim > run.feature_dim:
            raise UserError(f"-sfd {settings.sub_feature_dim} must be <= -fd {run.feature_dim} for FedMRL (the "
                            f"nested slice of the fused representation); pass a smaller -sfd or a larger -fd")

    def prepare(self):
        settings = self.settings
        channels, height, _ = self.context.image_shape
        try:
            # One initialization for every client's shared model, drawn from the server's seed.
            self.global_template = build_model(settings.mrl_model, self.num_classes, settings.sub_feature_dim,
                                               channels, height)
        except ValueError as exc:
            raise UserError(f"--mrl_model: {exc}") from None
        self.global_parameters = {k: v.to(self.device) for k, v in parameters_of(self.global_template).items()}
        tqdm.write(f"FedMRL: shared model {settings.mrl_model} ({float_count(self.global_parameters)} parameters), "
                   f"d1 {settings.sub_feature_dim}, loss weights {settings.mrl_global_weight} (shared) "
                   f"{settings.mrl_local_weight} (private), {settings.mrl_average} average")

    def client_spec(self):
        """The shared model's architecture and its one initial state (parameters and buffers), d1, loss weights."""
        channels, height, _ = self.context.image_shape
        s = self.settings
        return Payload(flatten(self.global_template.state_dict(), "global"),
                       {"mrl_model": s.mrl_model, "sub_feature_dim": s.sub_feature_dim, "channels": channels,
                        "height": height, "global_weight": s.mrl_global_weight, "local_weight": s.mrl_local_weight})

    @classmethod
    def new_client(cls, setup, spec):
        c = spec.config
        global_model = model_with_state(c["mrl_model"], setup.num_classes, c["sub_feature_dim"], c["channels"],
                                        c["height"], unflatten(spec.tensors, "global"))
        return ClientFedMRL(setup, global_model=global_model, nested_dim=c["sub_feature_dim"],
                            global_weight=c["global_weight"], local_weight=c["local_weight"])

    def payload_for(self, client_id):
        return Payload(flatten(self.global_parameters, "global"))

    def aggregate(self, uploads, timer):
        if uploads:
            models = [unflatten(upload.tensors, "global") for upload in uploads.values()]
            weights = ([upload.config["samples"] for upload in uploads.values()]
                       if self.settings.mrl_average == "samples" else [1] * len(models))
            self.global_parameters = weighted_average(models, weights)
        return {}

    def state_dict(self):
        return {"global_parameters": self.global_parameters}

    def load_state_dict(self, state):
        self.global_parameters = {k: v.to(self.device) for k, v in state["global_parameters"].items()}
