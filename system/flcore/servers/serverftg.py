"""FedFTG (Zhang, Shen, Ding, Tao, Duan, CVPR 2022): FedAvg of one shared architecture, then on the server a
conditional generator mines hard samples on which the class-level ensemble of the uploaded client models is
confident and the averaged global model disagrees with it, and the global model is fine-tuned to match the ensemble
on them (flcore/ftg_ops.py). Every client must hold the same architecture: `-m <one model name>`.

Per round: upload = (model floats + K label counts) per arrived client; download = (model floats) per selected
client. Model floats are the parameters and BatchNorm running statistics (flcore/fedavg.py)."""
import copy
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flcore.clients.clientfedavg import ClientFedAvg
from flcore.exchange import Payload, flatten, unflatten
from flcore.fedavg import load_shared_state, shared_state
from flcore.ftg_ops import ConditionalGenerator, FineTuneSettings, fine_tune
from flcore.parameters import float_count, weighted_average
from flcore.servers.serverbase import Server
from flcore.settings import Settings, option, raise_first_failed
from flcore.trainmodel import build_model, family_models

# The paper's noise sizes: 100 on CIFAR-10, 256 on CIFAR-100 (we use 256 from 11 classes on).
SMALL_NOISE_DIM, LARGE_NOISE_DIM, LARGE_NOISE_FROM_CLASSES = 100, 256, 11


@dataclass(frozen=True)
class FedFTGSettings(Settings):
    title = "FedFTG"
    description = ("one shared architecture (-m <model name>); the global model's SGD learning rate is -slr "
                   "(default: -lr, as the paper)")
    ftg_iterations: int = option(10, "--ftg_iterations",
                                 help="FedFTG: server iterations I per round, each on a fresh batch of labels and "
                                      "noise")
    ftg_generator_steps: int = option(1, "--ftg_generator_steps", help="FedFTG: generator steps I_g per iteration")
    ftg_distill_steps: int = option(5, "--ftg_distill_steps",
                                    help="FedFTG: global-model steps I_d per iteration")
    ftg_batch_size: int = option(64, "--ftg_batch_size", help="FedFTG: generated samples per batch")
    # None: 100 up to 10 classes, else 256 (it depends on the run's number of classes).
    ftg_noise_dim: int = option(None, "--ftg_noise_dim",
                                help="FedFTG: generator noise size (default: 100 up to 10 classes, else 256, as the "
                                     "paper)")
    ftg_generator_lr: float = option(0.01, "--ftg_generator_lr",
                                     help="FedFTG: the generator's Adam learning rate")
    ftg_generator_width: int = option(64, "--ftg_generator_width",
                                      help="FedFTG: the generator's base width (its first blocks have twice as many "
                                           "channels)")
    ftg_beta_tran: float = option(1.0, "--ftg_beta_tran",
                                  help="FedFTG: weight of the hard-sample term (global model vs. ensemble "
                                       "disagreement)")
    ftg_beta_div: float = option(1.0, "--ftg_beta_div", help="FedFTG: weight of the diversity term")
    # None: the clients' -lr.
    server_learning_rate: float = option(None, "-slr", "--server_learning_rate",
                                         help="FedFTG: the global model's SGD learning rate (default: -lr)")

    def validate(self):
        raise_first_failed([(ok, f"{flag} must be {bound} for FedFTG") for flag, ok, bound in (
            ("--ftg_iterations", self.ftg_iterations >= 1, ">= 1"),
            ("--ftg_generator_steps", self.ftg_generator_steps >= 0, ">= 0"),
            ("--ftg_distill_steps", self.ftg_distill_steps >= 0, ">= 0"),
            ("--ftg_batch_size", self.ftg_batch_size >= 2, ">= 2 (BatchNorm and pairwise diversity need two)"),
            ("--ftg_noise_dim", self.ftg_noise_dim is None or self.ftg_noise_dim >= 1, ">= 1"),
            ("--ftg_generator_lr", self.ftg_generator_lr > 0, "> 0"),
            ("--ftg_generator_width", self.ftg_generator_width >= 1, ">= 1"),
            ("--ftg_beta_tran", self.ftg_beta_tran >= 0, ">= 0"),
            ("--ftg_beta_div", self.ftg_beta_div >= 0, ">= 0"),
        )] + [(self.server_learning_rate is None or self.server_learning_rate > 0,
               f"-slr must be > 0, got {self.server_learning_rate}")])


class ServerFedFTG(Server):
    Settings = FedFTGSettings
    shared_model = True
    phases = ("eval", "train", "fine_tune")

    def prepare(self):
        settings = self.settings
        channels, height, width = self.context.image_shape
        # check_models made sure the family holds one architecture (shared_model).
        self.model_name = family_models(self.context.model_family)[0]
        self.global_model = build_model(self.model_name, self.num_classes, self.context.feature_dim, channels,
                                        height).to(self.device)
        # The module the clients' uploaded states are evaluated with (the class-level ensemble's members).
        self.teacher = copy.deepcopy(self.global_model).requires_grad_(False).eval()
        noise_dim = settings.ftg_noise_dim
        if noise_dim is None:
            noise_dim = SMALL_NOISE_DIM if self.num_classes < LARGE_NOISE_FROM_CLASSES else LARGE_NOISE_DIM
        self.generator = ConditionalGenerator(noise_dim, self.num_classes, (channels, height, width),
                                              settings.ftg_generator_width).to(self.device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=settings.ftg_generator_lr)
        self.fine_tune_settings = FineTuneSettings(
            iterations=settings.ftg_iterations, generator_steps=settings.ftg_generator_steps,
            distill_steps=settings.ftg_distill_steps, batch_size=settings.ftg_batch_size,
            beta_tran=settings.ftg_beta_tran, beta_div=settings.ftg_beta_div,
            learning_rate=(self.context.learning_rate if settings.server_learning_rate is None
                           else settings.server_learning_rate))
        self.rng = torch.Generator().manual_seed(self.seed)
        tuning = self.fine_tune_settings
        tqdm.write(f"FedFTG: shared model {self.model_name} ({float_count(shared_state(self.global_model))} floats), "
                   f"noise dim {noise_dim}, I={tuning.iterations}, I_g={tuning.generator_steps}, "
                   f"I_d={tuning.distill_steps}, batch {tuning.batch_size}, server lr {tuning.learning_rate}")

    @classmethod
    def new_client(cls, setup, spec):
        return ClientFedAvg(setup)

    def prepare_round(self, selected):
        self.round_state = shared_state(self.global_model)

    def payload_for(self, client_id):
        return Payload(flatten(self.round_state, "model"))

    def aggregate(self, uploads, timer):
        uploads = list(uploads.values())
        if not uploads:
            self.round_metrics = {name: math.nan for name in ("generator_loss", "distill_loss")}
            return {}
        states = [unflatten(u.tensors, "model") for u in uploads]
        load_shared_state(self.global_model, weighted_average(states, [u.config["samples"] for u in uploads]))
        with timer("fine_tune"):
            metrics = fine_tune(self.global_model, self.teacher, [{k: v.to(self.device) for k, v in s.items()}
                                                                  for s in states],
                                torch.stack([u.tensors["label_counts"] for u in uploads]), self.generator,
                                self.generator_optimizer, self.fine_tune_settings, self.rng)
        self.round_metrics = {"generator_loss": metrics["generator_loss"], "distill_loss": metrics["distill_loss"]}
        return {}

    def state_dict(self):
        return {"global_model": self.global_model.state_dict(), "generator": self.generator.state_dict(),
                "generator_optimizer": self.generator_optimizer.state_dict(),
                "rng": self.rng.get_state()}

    def load_state_dict(self, state):
        self.global_model.load_state_dict(state["global_model"])
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.rng.set_state(state["rng"])
