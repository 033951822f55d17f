"""FedFTG (Zhang, Shen, Ding, Tao, Duan, CVPR 2022): FedAvg of one shared architecture, then on the server a
conditional generator mines hard samples on which the class-level ensemble of the uploaded client models is
confident and the averaged global model disagrees with it, and the global model is fine-tuned to match the ensemble
on them (flcore/ftg_ops.py). Every client must hold the same architecture: `-m <one model name>`.

Per round: upload = (model floats + K label counts) per arrived client; download = (model floats) per selected
client. Model floats are the parameters and BatchNorm running statistics (flcore/fedavg.py)."""
import copy
import math

import torch
from tqdm import tqdm

from flcore.clients.clientfedavg import ClientFedAvg
from flcore.exchange import Payload, flatten, unflatten
from flcore.fedavg import load_shared_state, shared_state, single_model_name
from flcore.ftg_ops import ConditionalGenerator, FineTuneSettings, fine_tune
from flcore.parameters import float_count, weighted_average
from flcore.servers.serverbase import Server
from flcore.trainmodel import build_model
from flutils.options import flag_or_default, raise_first_failed

# The paper's noise sizes: 100 on CIFAR-10, 256 on CIFAR-100 (we use 256 from 11 classes on).
SMALL_NOISE_DIM, LARGE_NOISE_DIM, LARGE_NOISE_FROM_CLASSES = 100, 256, 11


class ServerFedFTG(Server):
    phases = ("eval", "train", "fine_tune")

    @classmethod
    def add_flags(cls, parser):
        group = parser.add_argument_group(
            "FedFTG", "one shared architecture (-m <model name>); the global model's SGD learning rate is -slr "
                      "(default: -lr, as the paper)")
        group.add_argument("--ftg_iterations", type=int, default=10,
                           help="FedFTG: server iterations I per round, each on a fresh batch of labels and noise")
        group.add_argument("--ftg_generator_steps", type=int, default=1, help="FedFTG: generator steps I_g per iteration")
        group.add_argument("--ftg_distill_steps", type=int, default=5,
                           help="FedFTG: global-model steps I_d per iteration")
        group.add_argument("--ftg_batch_size", type=int, default=64, help="FedFTG: generated samples per batch")
        group.add_argument("--ftg_noise_dim", type=int, default=None,
                           help="FedFTG: generator noise size (default: 100 up to 10 classes, else 256, as the paper)")
        group.add_argument("--ftg_generator_lr", type=float, default=0.01, help="FedFTG: the generator's Adam learning rate")
        group.add_argument("--ftg_generator_width", type=int, default=64,
                           help="FedFTG: the generator's base width (its first blocks have twice as many channels)")
        group.add_argument("--ftg_beta_tran", type=float, default=1.0,
                           help="FedFTG: weight of the hard-sample term (global model vs. ensemble disagreement)")
        group.add_argument("--ftg_beta_div", type=float, default=1.0, help="FedFTG: weight of the diversity term")

    @classmethod
    def check_flags(cls, args):
        single_model_name(args.model_family, args.algorithm)
        raise_first_failed([(ok, f"{flag} must be {bound} for FedFTG") for flag, ok, bound in (
            ("--ftg_iterations", args.ftg_iterations >= 1, ">= 1"),
            ("--ftg_generator_steps", args.ftg_generator_steps >= 0, ">= 0"),
            ("--ftg_distill_steps", args.ftg_distill_steps >= 0, ">= 0"),
            ("--ftg_batch_size", args.ftg_batch_size >= 2, ">= 2 (BatchNorm and pairwise diversity need two)"),
            ("--ftg_noise_dim", args.ftg_noise_dim is None or args.ftg_noise_dim >= 1, ">= 1"),
            ("--ftg_generator_lr", args.ftg_generator_lr > 0, "> 0"),
            ("--ftg_generator_width", args.ftg_generator_width >= 1, ">= 1"),
            ("--ftg_beta_tran", args.ftg_beta_tran >= 0, ">= 0"),
            ("--ftg_beta_div", args.ftg_beta_div >= 0, ">= 0"),
        )])

    def prepare(self):
        args = self.args
        channels, height, width = self.dataset.image_shape
        self.model_name = single_model_name(args.model_family, args.algorithm)
        self.global_model = build_model(self.model_name, self.num_classes, args.feature_dim, channels,
                                        height).to(self.device)
        # The module the clients' uploaded states are evaluated with (the class-level ensemble's members).
        self.teacher = copy.deepcopy(self.global_model).requires_grad_(False).eval()
        noise_dim = flag_or_default(args.ftg_noise_dim, SMALL_NOISE_DIM if self.num_classes < LARGE_NOISE_FROM_CLASSES
                                    else LARGE_NOISE_DIM, "--ftg_noise_dim", at_least=1)
        self.generator = ConditionalGenerator(noise_dim, self.num_classes, (channels, height, width),
                                              args.ftg_generator_width).to(self.device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=args.ftg_generator_lr)
        self.settings = FineTuneSettings(
            iterations=args.ftg_iterations, generator_steps=args.ftg_generator_steps,
            distill_steps=args.ftg_distill_steps, batch_size=args.ftg_batch_size, beta_tran=args.ftg_beta_tran,
            beta_div=args.ftg_beta_div,
            learning_rate=flag_or_default(args.server_learning_rate, args.local_learning_rate, "-slr", above=0))
        self.torch_generator = torch.Generator().manual_seed(self.seed)
        tqdm.write(f"FedFTG: shared model {self.model_name} ({float_count(shared_state(self.global_model))} floats), "
                   f"noise dim {noise_dim}, I={self.settings.iterations}, I_g={self.settings.generator_steps}, "
                   f"I_d={self.settings.distill_steps}, batch {self.settings.batch_size}, "
                   f"server lr {self.settings.learning_rate}")

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
                                self.generator_optimizer, self.settings, self.torch_generator)
        self.round_metrics = {"generator_loss": metrics["generator_loss"], "distill_loss": metrics["distill_loss"]}
        return {}

    def extra_state(self):
        return {"global_model": self.global_model.state_dict(), "generator": self.generator.state_dict(),
                "generator_optimizer": self.generator_optimizer.state_dict(),
                "torch_generator": self.torch_generator.get_state()}

    def load_extra_state(self, state):
        self.global_model.load_state_dict(state["global_model"])
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.torch_generator.set_state(state["torch_generator"])
