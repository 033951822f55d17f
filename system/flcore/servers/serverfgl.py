"""FGL (Federated Generative Learning with Foundation Models, Zhang et al.): in the first round clients upload
prompts instead of parameters (class-level prompts from the dataset's class names, sent as the token ids of the
pipeline's public tokenizer); the server renders a training set from them with Stable Diffusion (-GPath, loaded by
the generator registry's Stable Diffusion module, flcore/generators/stable_diffusion.py), trains the global model on
it, and FedAvg rounds on the clients' real data follow (flcore/fgl_ops.py). Every client must hold the same
architecture: `-m <one model name>`.

Per round: upload = the prompts' token ids, sum of C_i * L (L = the tokenizer's length, 77 for Stable Diffusion),
in the first round; (model floats) per arrived client afterwards. Download = (model floats) per selected client once
the global model is trained."""
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from flcore.clients.clientfgl import ClientFGL
from flcore.errors import UserError
from flcore.exchange import Payload, flatten, unflatten
from flcore.fedavg import load_shared_state, shared_state
from flcore.fgl_ops import DEFAULT_TEMPLATE, class_prompts, pooled_prompts, synthesize, train_on
from flcore.generators.stable_diffusion import (StableDiffusionSettings, latent_shape_at, load_pipeline,
                                                pipeline_module)
from flcore.parameters import weighted_average
from flcore.servers.serverbase import Server
from flcore.settings import option, raise_first_failed
from flcore.trainmodel import build_model, family_models

WEIGHTS_README = "stable-diffusion/v1.5/README.md"


@dataclass(frozen=True)
class FGLSettings(StableDiffusionSettings):
    title = "FGL"
    description = ("one shared architecture (-m <model name>); Stable Diffusion from -GPath with --sd_steps, "
                   "--sd_guidance, --sd_negative_prompt, --sd_resolution, -gbs; the server's SGD learning rate is -slr "
                   "(default: -lr)")
    fgl_prompt_template: str = option(DEFAULT_TEMPLATE, "--fgl_prompt_template",
                                      help="FGL: class-level prompt, {} is replaced by the class name (the paper's "
                                           "Table 5)")
    fgl_images_per_class: int = option(2000, "--fgl_images_per_class",
                                       help="FGL: synthetic images per class (the paper's Fig. 5 ranges 2,000 to "
                                            "20,000)")
    fgl_server_epochs: int = option(120, "--fgl_server_epochs",
                                    help="FGL: epochs of the server's training on the synthetic set (the paper)")
    fgl_server_batch_size: int = option(128, "--fgl_server_batch_size",
                                        help="FGL: batch size of the server's training (not given in the paper)")
    fgl_momentum: float = option(0.9, "--fgl_momentum", help="FGL: the server's SGD momentum (the paper)")
    fgl_finetune_epochs: int = option(0, "--fgl_finetune_epochs",
                                      help="FGL: epochs on the synthetic set after each later FedAvg round (the "
                                           "paper's '5-round-syn' variant; 0: plain FedAvg rounds, its default)")
    # None: the clients' -lr.
    server_learning_rate: float = option(None, "-slr", "--server_learning_rate",
                                         help="FGL: the server's SGD learning rate (default: -lr)")

    def validate(self):
        if not self.generator_path:
            raise UserError(f"-algo FGL needs -GPath <diffusers Stable Diffusion folder>, e.g. -GPath "
                            f"stable-diffusion/v1.5 (see {WEIGHTS_README} to get the weights)")
        template = self.fgl_prompt_template
        raise_first_failed([
            (template.count("{}") == 1 and template.replace("{}", "").count("{") == 0
             and template.replace("{}", "").count("}") == 0,
             f"--fgl_prompt_template must hold exactly one {{}} for the class name, got {template!r}"),
            (self.fgl_images_per_class >= 1, "--fgl_images_per_class must be >= 1"),
            (self.fgl_server_epochs >= 0, "--fgl_server_epochs must be >= 0"),
            (self.fgl_server_batch_size >= 2, "--fgl_server_batch_size must be >= 2 (BatchNorm needs two)"),
            (0 <= self.fgl_momentum < 1, "--fgl_momentum must be in [0, 1)"),
            (self.fgl_finetune_epochs >= 0, "--fgl_finetune_epochs must be >= 0"),
            (self.sd_steps >= 1, f"--sd_steps must be >= 1, got {self.sd_steps}"),
            (self.gen_batch_size >= 1, f"-gbs must be >= 1, got {self.gen_batch_size}"),
            (self.server_learning_rate is None or self.server_learning_rate > 0,
             f"-slr must be > 0, got {self.server_learning_rate}"),
        ])


class ServerFGL(Server):
    Settings = FGLSettings
    shared_model = True
    phases = ("eval", "train", "synthesize", "server_train")

    def prepare(self):
        settings = self.settings
        channels, height, _ = self.context.image_shape
        # check_models made sure the family holds one architecture (shared_model).
        self.model_name = family_models(self.context.model_family)[0]
        class_names = self.class_names()
        self.pipeline = load_pipeline(pipeline_module(), settings, self.device, self.cache)
        resolution = settings.sd_resolution or self.pipeline.default_resolution
        self.latent_shape = latent_shape_at(self.pipeline, settings.sd_resolution)
        self.class_tokens = self.pipeline.tokenize(class_prompts(class_names, settings.fgl_prompt_template))
        self.global_model = build_model(self.model_name, self.num_classes, self.context.feature_dim, channels,
                                        height).to(self.device)
        self.learning_rate = (self.context.learning_rate if settings.server_learning_rate is None
                              else settings.server_learning_rate)
        self.global_trained = False
        self.synthetic = None  # (images, labels), kept for --fgl_finetune_epochs only
        self.rng = torch.Generator().manual_seed(self.seed)
        tqdm.write(f"FGL: shared model {self.model_name}, Stable Diffusion from {settings.generator_path} "
                   f"({resolution}x{resolution}, {settings.sd_steps} steps, guidance {settings.sd_guidance}), "
                   f"{settings.fgl_images_per_class} images per class, {settings.fgl_server_epochs} server epochs, "
                   f"prompt e.g. {class_prompts(class_names[:1], settings.fgl_prompt_template)[0]!r}")

    def class_names(self):
        """The label names of the dataset's config.json, which the class-level prompts are made of."""
        names = self.context.class_names
        config_path = f"{self.context.dataset_folder}/config.json"
        if names is None:
            raise UserError(f"-algo FGL builds its prompts from class names, and {config_path} has none: regenerate "
                            f"the dataset with its dataset/generate_*.py script, or add \"class_names\": [...] "
                            f"({self.num_classes} names in label order) to it")
        if len(names) != self.num_classes or not all(isinstance(n, str) and n.strip() for n in names):
            raise UserError(f"\"class_names\" in {config_path} must list {self.num_classes} non-empty names in "
                            f"label order, got {len(names)}")
        return names

    def client_spec(self):
        """Every class's prompt as token ids (public: the class names and the tokenizer)."""
        return Payload({"class_tokens": self.class_tokens})

    @classmethod
    def new_client(cls, setup, spec):
        return ClientFGL(setup, spec.tensors["class_tokens"])

    def prepare_round(self, selected):
        self.round_state = shared_state(self.global_model) if self.global_trained else None

    def payload_for(self, client_id):
        return None if self.round_state is None else Payload(flatten(self.round_state, "model"))

    def aggregate(self, uploads, timer):
        prompts = [u for u in uploads.values() if "prompt_tokens" in u.tensors]
        models = [unflatten(u.tensors, "model") for u in uploads.values() if "prompt_tokens" not in u.tensors]
        samples = [u.config["samples"] for u in uploads.values() if "prompt_tokens" not in u.tensors]
        synthesized, loss = 0, math.nan
        if prompts and not self.global_trained:
            images, labels = self.synthesize(pooled_prompts(prompts), timer)
            synthesized = len(labels)
            with timer("server_train"):
                loss = self.train_global(images, labels, self.settings.fgl_server_epochs)
            self.global_trained = True
            self.synthetic = (images, labels) if self.settings.fgl_finetune_epochs else None
        elif models:
            load_shared_state(self.global_model, weighted_average(models, samples))
            if self.synthetic is not None:
                with timer("server_train"):
                    loss = self.train_global(*self.synthetic, self.settings.fgl_finetune_epochs)
        self.round_metrics = {"synthetic_images": synthesized, "server_train_loss": loss}
        return {}

    def synthesize(self, prompts, timer):
        settings = self.settings
        with timer("synthesize"):
            images, labels = synthesize(self.pipeline, prompts, settings.fgl_images_per_class,
                                        self.context.image_shape, self.latent_shape, settings.sd_steps,
                                        settings.sd_guidance, settings.sd_negative_prompt, settings.gen_batch_size,
                                        self.rng)
        tqdm.write(f"FGL: synthesized {len(labels)} images of {len(prompts)} classes")
        return images, labels

    def train_global(self, images, labels, epochs):
        return train_on(self.global_model, images, labels, epochs, self.settings.fgl_server_batch_size,
                        self.learning_rate, self.settings.fgl_momentum, self.rng)

    def state_dict(self):
        return {"global_model": self.global_model.state_dict(), "global_trained": self.global_trained,
                "synthetic": self.synthetic, "rng": self.rng.get_state()}

    def load_state_dict(self, state):
        self.global_model.load_state_dict(state["global_model"])
        self.global_trained = state["global_trained"]
        self.synthetic = state["synthetic"]
        self.rng.set_state(state["rng"])
