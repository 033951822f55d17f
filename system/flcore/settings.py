"""Typed settings. The runner and every algorithm declare their flags as fields of a frozen dataclass; the command
line (flutils/options.py) is built from those fields, and each receives one resolved, validated instance.

    @dataclass(frozen=True)
    class FedDistillSettings(Settings):
        title = "FedDistill"
        lamda: float = option(1.0, "-lam", "--lamda", help="weight of the logit regularizer")

        def validate(self):
            raise_first_failed([(self.lamda >= 0, f"-lam must be >= 0, got {self.lamda}")])

Several algorithms may declare the same flag (same names), each with its own default: the flag is parsed once,
and each algorithm's settings take its own default when the flag is not given."""
import argparse
from dataclasses import dataclass, field, fields

from flcore.errors import UserError
from flcore.paths import DATASET_DIR, RESULTS_DIR

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def str2bool(value):
    """0/1/true/false (argparse's type=bool would turn any non-empty string, "0" included, into True)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (0/1/true/false), got {value!r}")


def option(default, *flags, help="", choices=None):
    """A settings field that is also a command-line flag: `flags` are its names (e.g. "-lam", "--lamda"; the long
    name is the field's name), `choices` its allowed values."""
    return field(default=default, metadata={"flags": flags, "help": help, "choices": choices})


def raise_first_failed(checks):
    """checks: (condition, message) pairs; raises UserError with the message of the first false condition."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


@dataclass(frozen=True)
class Settings:
    """The base of every settings class: no fields. `title` and `description` name the group that `main.py -h`
    lists the class's own flags in."""
    title = "settings"
    description = ""

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raises UserError (one line that names the flag and the fix) for a bad value; runs on construction."""

    @classmethod
    def from_values(cls, values):
        """The settings whose fields are given in `values` (a mapping by field name; other keys are ignored), the
        class's defaults for the rest."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def values(self):
        """{field name: value}."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def own_fields(cls):
    """The flag fields that `cls` declares itself (not those it inherits), in declaration order."""
    inherited = {f.name for base in cls.__mro__[1:] if hasattr(base, "__dataclass_fields__") for f in fields(base)}
    declared = cls.__dict__.get("__annotations__", {})
    return [f for f in fields(cls) if f.name in declared and f.name not in inherited and "flags" in f.metadata]


def field_type(f):
    """The Python type a flag parses to: the field's annotation (a class or its name)."""
    names = {"int": int, "float": float, "str": str, "bool": bool}
    return names.get(f.type, f.type) if isinstance(f.type, str) else f.type


@dataclass(frozen=True)
class RunSettings(Settings):
    """What every run is set by, whatever the algorithm: the federation, local training, the simulated system,
    speed, client state, checkpoints and where things are read and written (the runner's and the harness's)."""
    title = "general"
    goal: str = option("test", "-go", "--goal", help="tag in the result file names (<dataset>_<algo>_<goal>_<run>)")
    device: str = option("auto", "-dev", "--device", choices=("auto", "cpu", "cuda"),
                         help="auto: cuda when available, else cpu; cuda falls back to cpu with a notice when CUDA is "
                              "not available")
    device_id: str = option("0", "-did", "--device_id", help="CUDA device index")
    dataset: str = option("Digits", "-data", "--dataset",
                          help="folder name under --dataset_dir, made by a dataset/generate_*.py script")
    num_classes: int = option(10, "-nb", "--num_classes")
    model_family: str = option("HtCPU4", "-m", "--model_family",
                               help="heterogeneous model family (or HtFLlib's name of one) or one model, a base "
                                    "or base+head (e.g. resnet34+mlp256): client i gets family[i %% len(family)]")
    feature_dim: int = option(512, "-fd", "--feature_dim")
    algorithm: str = option("FedKTL-stylegan-3", "-algo", "--algorithm",
                            help="the algorithm to run: FedKTL-stylegan-xl, FedKTL-stylegan-3, "
                                 "FedKTL-stable-diffusion or a baseline (each has a group of its own flags below)")
    global_rounds: int = option(10, "-gr", "--global_rounds")
    num_clients: int = option(4, "-nc", "--num_clients")
    join_ratio: float = option(1.0, "-jr", "--join_ratio", help="fraction of clients that train in a round, in (0, 1]")
    random_join_ratio: bool = option(False, "-rjr", "--random_join_ratio",
                                     help="draw the number of joining clients each round between jr*N and N")
    times: int = option(1, "-t", "--times", help="independent runs, each with its own seed")
    prev: int = option(0, "-pv", "--prev", help="index of the first run (to add runs later)")
    eval_gap: int = option(1, "-eg", "--eval_gap", help="evaluate every this many rounds")
    auto_break: bool = option(False, "-ab", "--auto_break",
                              help="stop when accuracy has not improved for -tc evaluations")
    top_cnt: int = option(100, "-tc", "--top_cnt")
    save_folder_name: str = option("", "-sfn", "--save_folder_name",
                                   help="folder for per-round checkpoints (none when empty)")
    resume: bool = option(False, "--resume", help="continue each run from its last checkpoint in -sfn")
    client_state: str = option("auto", "--client_state", choices=("auto", "memory", "disk"),
                               help="where each client's state waits between its turns: all in memory (fastest), on "
                                    "disk with one client in memory at a time (memory stays flat with many or large "
                                    "clients), or auto: memory when the estimated state fits in the available memory "
                                    "(results are the same either way)")
    client_state_dir: str = option("", "--client_state_dir",
                                   help="folder of the disk store (default: client_state/ in -sfn, else in "
                                        "--results_dir)")
    num_threads: int = option(0, "--num_threads",
                              help="CPU threads for torch (0: torch's default, one per core); with -pc N each worker "
                                   "gets 1/N of them. main.py lets waiting threads sleep (OMP_WAIT_POLICY=PASSIVE "
                                   "unless set), so a busy machine slows a run gracefully; on shared cores 1 is often "
                                   "fastest. The count changes the order of float sums: results may differ in the "
                                   "last bits")
    parallel_clients: int = option(1, "-pc", "--parallel_clients",
                                   help="clients that train at the same time, in this many worker processes (on CUDA "
                                        "--workers_per_gpu per GPU, round robin from -did); results are the same as one at a time "
                                        "(1)")
    workers_per_gpu: int = option(1, "--workers_per_gpu",
                                  help="with -pc on CUDA: this many workers share each GPU (worker k takes GPU -did + "
                                       "k // N), so small client models fill a large GPU; without CUDA it changes "
                                       "nothing; same results")
    amp: str = option("off", "--amp", choices=("off", "bf16", "fp16"),
                      help="mixed precision of the clients' training steps: autocast to bf16 (CPU or CUDA) or fp16 "
                           "(CUDA, with a grad scaler); changes results within the tolerance docs/speed.md states")
    compile: bool = option(False, "--compile",
                           help="torch.compile each client's model (compile time lands in its first turns); results "
                                "may differ in the last bits")
    channels_last: bool = option(False, "--channels_last",
                                 help="client models in the channels-last memory layout: faster convolutions for some "
                                      "models and slower for others (docs/speed.md); results differ in the last "
                                      "bits")
    offload: bool = option(False, "--offload",
                           help="client models and optimizer state wait in CPU memory between turns and move to the "
                                "GPU only for their turn (many large clients on one GPU); same results; nothing to "
                                "move on the CPU")
    cudnn_benchmark: bool = option(False, "--cudnn_benchmark",
                                   help="let cuDNN time its convolution algorithms and keep the fastest (CUDA; results "
                                        "may differ between runs in the last bits)")
    seed: int = option(0, "--seed", help="base seed; run r and client i derive their own")
    dataset_dir: str = option(DATASET_DIR, "--dataset_dir")
    results_dir: str = option(RESULTS_DIR, "--results_dir")
    image_every: int = option(1, "--image_every",
                              help="algorithms that generate images (FedKTL): save the grid every this many rounds "
                                   "(0: never)")
    logger: str = option("none", "--logger", choices=("none", "tensorboard", "wandb"),
                         help="also send every round's scalars and generated image grids to TensorBoard (event files "
                              "in --results_dir/tensorboard/) or W&B (needs `pip install wandb`; WANDB_MODE=offline "
                              "works without a network); the .h5, .json and .png are written either way")
    shots: int = option(0, "--shots", help="keep only this many training samples per class on each client "
                                           "(N-way K-shot, the paper's cloud-edge setting; 0: all)")
    batch_size: int = option(10, "-lbs", "--batch_size")
    local_learning_rate: float = option(0.01, "-lr", "--local_learning_rate")
    learning_rate_decay: bool = option(False, "-ld", "--learning_rate_decay", help="decay each client's lr every round")
    learning_rate_decay_gamma: float = option(0.99, "-ldg", "--learning_rate_decay_gamma")
    local_epochs: int = option(1, "-ls", "--local_epochs")
    client_drop_rate: float = option(0.0, "-cdr", "--client_drop_rate",
                                     help="fraction of the trained clients whose upload is lost each round")
    train_slow_rate: float = option(0.0, "-tsr", "--train_slow_rate",
                                    help="fraction of clients that train fewer local epochs")
    send_slow_rate: float = option(0.0, "-ssr", "--send_slow_rate",
                                   help="fraction of clients with a simulated upload delay")
    time_select: bool = option(False, "-ts", "--time_select", help="drop uploads whose simulated time exceeds -tth")
    time_threshold: float = option(10000.0, "-tth", "--time_threshold", help="seconds")

    def validate(self):
        raise_first_failed([
            (0.0 < self.join_ratio <= 1.0, f"-jr must be in (0, 1], got {self.join_ratio}"),
            (0.0 <= self.client_drop_rate < 1.0, f"-cdr must be in [0, 1), got {self.client_drop_rate}"),
            (0.0 <= self.train_slow_rate <= 1.0, f"-tsr must be in [0, 1], got {self.train_slow_rate}"),
            (0.0 <= self.send_slow_rate <= 1.0, f"-ssr must be in [0, 1], got {self.send_slow_rate}"),
            (self.num_clients >= 1, f"-nc must be at least 1, got {self.num_clients}"),
            (self.num_classes >= 2, f"-nb must be at least 2, got {self.num_classes}"),
            (self.global_rounds >= 0, f"-gr must be >= 0, got {self.global_rounds}"),
            (self.eval_gap >= 1, f"-eg must be >= 1, got {self.eval_gap}"),
            (self.batch_size >= 1, f"-lbs must be >= 1, got {self.batch_size}"),
            (self.local_epochs >= 1, f"-ls must be >= 1, got {self.local_epochs}"),
            (self.local_learning_rate > 0, f"-lr must be > 0, got {self.local_learning_rate}"),
            (self.feature_dim >= 1, f"-fd must be >= 1, got {self.feature_dim}"),
            (self.times >= 1, f"-t must be >= 1, got {self.times}"),
            (0 <= self.prev < self.times, f"-pv must be in [0, -t), got {self.prev}"),
            (self.shots >= 0, f"--shots must be >= 0, got {self.shots}"),
            (self.num_threads >= 0, f"--num_threads must be >= 0, got {self.num_threads}"),
            (self.parallel_clients >= 1, f"-pc must be >= 1 (1: one client at a time), got {self.parallel_clients}"),
            (self.workers_per_gpu >= 1, f"--workers_per_gpu must be >= 1, got {self.workers_per_gpu}"),
            (self.top_cnt >= 1, f"-tc must be >= 1, got {self.top_cnt}"),
            (self.image_every >= 0, f"--image_every must be >= 0, got {self.image_every}"),
            (not self.resume or self.save_folder_name, "--resume needs -sfn DIR, the folder holding the checkpoints"),
        ])


@dataclass(frozen=True)
class Config:
    """One configuration: the run's settings and the algorithm's (`algo`, of its server's Settings class)."""
    run: RunSettings
    algo: Settings

    def values(self):
        """Every setting by field name (the run's, then the algorithm's)."""
        return {**self.run.values(), **self.algo.values()}
