"""FGL (Federated Generative Learning with Foundation Models, Zhang et al.): in the first round clients upload
prompts instead of parameters (class-level prompts from the dataset's class names, sent as the token ids of the
pipeline's public tokenizer); the server renders a training set from them with Stable Diffusion (-GPath, loaded as
FedKTL-stable-diffusion loads it), trains the global model on it, and FedAvg rounds on the clients' real data follow
(flcore/fgl_ops.py). Every client must hold the same architecture: `-m <one model name>`.

Per round: upload = the prompts' token ids, sum of C_i * L (L = the tokenizer's length, 77 for Stable Diffusion),
in the first round; (model floats) per arrived client afterwards. Download = (model floats) per selected client once
the global model is trained."""
import math

import torch
from tqdm import tqdm

from flcore.clients.clientfgl import ClientFGL
from flcore.exchange import Payload, flatten, unflatten
from flcore.fedavg import load_shared_state, shared_state, single_model_name
from flcore.fgl_ops import DEFAULT_TEMPLATE, class_prompts, pooled_prompts, synthesize, train_on
from flcore.parameters import weighted_average
from flcore.servers.serverbase import Server
from flcore.servers.serverktl_stable_diffusion import load_pipeline, pipeline_module
from flcore.trainmodel import build_model
from flcore.errors import UserError
from flutils.options import flag_or_default, raise_first_failed

WEIGHTS_README = "stable-diffusion/v1.5/README.md"


class ServerFGL(Server):
    phases = ("eval", "train", "synthesize", "server_train")

    @classmethod
    def add_flags(cls, parser):
        group = parser.add_argument_group(
            "FGL", "one shared architecture (-m <model name>); Stable Diffusion from -GPath with --sd_steps, "
                   "--sd_guidance, --sd_negative_prompt, --sd_resolution, -gbs; the server's SGD learning rate is "
                   "-slr (default: -lr)")
        group.add_argument("--fgl_prompt_template", default=DEFAULT_TEMPLATE,
                           help="FGL: class-level prompt, {} is replaced by the class name (the paper's Table 5)")
        group.add_argument("--fgl_images_per_class", type=int, default=2000,
                           help="FGL: synthetic images per class (the paper's Fig. 5 ranges 2,000 to 20,000)")
        group.add_argument("--fgl_server_epochs", type=int, default=120,
                           help="FGL: epochs of the server's training on the synthetic set (the paper)")
        group.add_argument("--fgl_server_batch_size", type=int, default=128,
                           help="FGL: batch size of the server's training (not given in the paper)")
        group.add_argument("--fgl_momentum", type=float, default=0.9, help="FGL: the server's SGD momentum (the paper)")
        group.add_argument("--fgl_finetune_epochs", type=int, default=0,
                           help="FGL: epochs on the synthetic set after each later FedAvg round (the paper's "
                                "'5-round-syn' variant; 0: plain FedAvg rounds, its default)")

    @classmethod
    def check_flags(cls, args):
        single_model_name(args.model_family, args.algorithm)
        if not args.generator_path:
            raise UserError(f"-algo FGL needs -GPath <diffusers Stable Diffusion folder>, e.g. -GPath "
                            f"stable-diffusion/v1.5 (see {WEIGHTS_README} to get the weights)")
        template = args.fgl_prompt_template
        raise_first_failed([
            (template.count("{}") == 1 and template.replace("{}", "").count("{") == 0
             and template.replace("{}", "").count("}") == 0,
             f"--fgl_prompt_template must hold exactly one {{}} for the class name, got {template!r}"),
            (args.fgl_images_per_class >= 1, "--fgl_images_per_class must be >= 1"),
            (args.fgl_server_epochs >= 0, "--fgl_server_epochs must be >= 0"),
            (args.fgl_server_batch_size >= 2, "--fgl_server_batch_size must be >= 2 (BatchNorm needs two)"),
            (0 <= args.fgl_momentum < 1, "--fgl_momentum must be in [0, 1)"),
            (args.fgl_finetune_epochs >= 0, "--fgl_finetune_epochs must be >= 0"),
            (args.sd_steps >= 1, f"--sd_steps must be >= 1, got {args.sd_steps}"),
            (args.gen_batch_size >= 1, f"-gbs must be >= 1, got {args.gen_batch_size}"),
        ])

    def prepare(self):
        args = self.args
        channels, height, _ = self.dataset.image_shape
        self.model_name = single_model_name(args.model_family, args.algorithm)
        class_names = self.class_names()
        self.pipeline = load_pipeline(pipeline_module(), args, self.device, self.cache)
        resolution = args.sd_resolution or self.pipeline.default_resolution
        try:
            self.latent_shape = self.pipeline.latent_shape(resolution)
        except ValueError as exc:
            raise UserError(f"--sd_resolution: {exc}") from None
        self.class_tokens = self.pipeline.tokenize(class_prompts(class_names, args.fgl_prompt_template))
        self.global_model = build_model(self.model_name, self.num_classes, args.feature_dim, channels,
                                        height).to(self.device)
        self.learning_rate = flag_or_default(args.server_learning_rate, args.local_learning_rate, "-slr", above=0)
        self.global_trained = False
        self.synthetic = None  # (images, labels), kept for --fgl_finetune_epochs only
        self.torch_generator = torch.Generator().manual_seed(self.seed)
        tqdm.write(f"FGL: shared model {self.model_name}, Stable Diffusion from {args.generator_path} "
                   f"({resolution}x{resolution}, {args.sd_steps} steps, guidance {args.sd_guidance}), "
                   f"{args.fgl_images_per_class} images per class, {args.fgl_server_epochs} server epochs, "
                   f"prompt e.g. {class_prompts(class_names[:1], args.fgl_prompt_template)[0]!r}")

    def class_names(self):
        """The label names of the dataset's config.json, which the class-level prompts are made of."""
        names = self.dataset.config.get("class_names")
        config_path = f"{self.dataset.folder}/config.json"
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
                loss = self.train_global(images, labels, self.args.fgl_server_epochs)
            self.global_trained = True
            self.synthetic = (images, labels) if self.args.fgl_finetune_epochs else None
        elif models:
            load_shared_state(self.global_model, weighted_average(models, samples))
            if self.synthetic is not None:
                with timer("server_train"):
                    loss = self.train_global(*self.synthetic, self.args.fgl_finetune_epochs)
        self.round_metrics = {"synthetic_images": synthesized, "server_train_loss": loss}
        return {}

    def synthesize(self, prompts, timer):
        args = self.args
        with timer("synthesize"):
            images, labels = synthesize(self.pipeline, prompts, args.fgl_images_per_class, self.dataset.image_shape,
                                        self.latent_shape, args.sd_steps, args.sd_guidance, args.sd_negative_prompt,
                                        args.gen_batch_size, self.torch_generator)
        tqdm.write(f"FGL: synthesized {len(labels)} images of {len(prompts)} classes")
        return images, labels

    def train_global(self, images, labels, epochs):
        return train_on(self.global_model, images, labels, epochs, self.args.fgl_server_batch_size,
                        self.learning_rate, self.args.fgl_momentum, self.torch_generator)

    def extra_state(self):
        return {"global_model": self.global_model.state_dict(), "global_trained": self.global_trained,
                "synthetic": self.synthetic, "torch_generator": self.torch_generator.get_state()}

    def load_extra_state(self, state):
        self.global_model.load_state_dict(state["global_model"])
        self.global_trained = state["global_trained"]
        self.synthetic = state["synthetic"]
        self.torch_generator.set_state(state["torch_generator"])
