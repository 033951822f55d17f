"""Command-line flags of main.py: the reference library's short names, plus a few of our own.

The general flags live here; each algorithm declares its own in its server class (`add_flags`, `check_flags`),
collected by `hook_owners`, so `main.py -h` lists them grouped by algorithm."""
import argparse

from flcore.algorithms import server_class, server_classes
from flcore.errors import UserError
from flcore.paths import DATASET_DIR, RESULTS_DIR

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def str2bool(value):
    """Parse 0/1/true/false (argparse's type=bool would turn any non-empty string, "0" included, into True)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (0/1/true/false), got {value!r}")


def bool_flag(parser, short, long, default, help_text):
    """A 0|1 flag; `short` None: the long name only."""
    names = [name for name in (short, long) if name]
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="0|1", help=help_text)


def build_parser():
    p = argparse.ArgumentParser(
        description="Heterogeneous federated learning: FedKTL and baselines, simulated in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    general = p.add_argument_group("general")
    general.add_argument("-go", "--goal", default="test", help="tag used in result file names")
    general.add_argument("-dev", "--device", default="cuda", choices=["cpu", "cuda"],
                         help="falls back to cpu with a notice when CUDA is not available")
    general.add_argument("-did", "--device_id", default="0", help="CUDA device index")
    general.add_argument("-data", "--dataset", default="Digits",
                         help="folder name under --dataset_dir, made by a dataset/generate_*.py script")
    general.add_argument("-nb", "--num_classes", type=int, default=10)
    general.add_argument("-m", "--model_family", default="HtCPU4",
                         help="heterogeneous model family: client i gets family[i %% len(family)]")
    general.add_argument("-fd", "--feature_dim", type=int, default=512)
    general.add_argument("-algo", "--algorithm", default="FedKTL-stylegan-3")
    general.add_argument("-gr", "--global_rounds", type=int, default=10)
    general.add_argument("-nc", "--num_clients", type=int, default=4)
    general.add_argument("-jr", "--join_ratio", type=float, default=1.0,
                         help="fraction of clients that train in a round, in (0, 1]")
    bool_flag(general, "-rjr", "--random_join_ratio", False,
               "draw the number of joining clients each round between jr*N and N")
    general.add_argument("-t", "--times", type=int, default=1, help="independent runs, each with its own seed")
    general.add_argument("-pv", "--prev", type=int, default=0, help="index of the first run (to add runs later)")
    general.add_argument("-eg", "--eval_gap", type=int, default=1, help="evaluate every this many rounds")
    bool_flag(general, "-ab", "--auto_break", False, "stop when accuracy has not improved for -tc evaluations")
    general.add_argument("-tc", "--top_cnt", type=int, default=100)
    general.add_argument("-sfn", "--save_folder_name", default="",
                         help="folder for per-round checkpoints (none when empty)")
    general.add_argument("--resume", action="store_true",
                         help="continue each run from its last checkpoint in -sfn")
    general.add_argument("--client_state", default="auto", choices=["auto", "memory", "disk"],
                         help="where each client's state waits between its turns: all in memory (fastest), on disk "
                              "with one client in memory at a time (memory stays flat with many or large clients), "
                              "or auto: memory when the estimated state fits in the available memory (results are "
                              "the same either way)")
    general.add_argument("--client_state_dir", default="",
                         help="folder of the disk store (default: client_state/ in -sfn, else in --results_dir)")
    general.add_argument("--num_threads", type=int, default=0,
                         help="CPU threads for torch (0: torch's default); with -pc N each worker gets 1/N of them")
    general.add_argument("-pc", "--parallel_clients", type=int, default=1,
                         help="clients that train at the same time, in this many worker processes (on CUDA one per "
                              "GPU, round robin from -did); results are the same as one at a time (1)")
    speed = p.add_argument_group("speed (README \"Speed\"; off by default: results as without them unless said)")
    speed.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                       help="mixed precision of the clients' training steps: autocast to bf16 (CPU or CUDA) or fp16 "
                            "(CUDA, with a grad scaler); changes results within the tolerance README states")
    bool_flag(speed, None, "--compile", False,
              "torch.compile each client's model (compile time lands in its first turns); results may differ in "
              "the last bits")
    bool_flag(speed, None, "--channels_last", False,
              "client models in the channels-last memory layout: faster convolutions for some models and slower for "
              "others (README \"Speed\"); results differ in the last bits")
    bool_flag(speed, None, "--offload", False,
              "client models and optimizer state wait in CPU memory between turns and move to the GPU only for "
              "their turn (many large clients on one GPU); same results; nothing to move on the CPU")
    bool_flag(speed, None, "--cudnn_benchmark", False,
              "let cuDNN time its convolution algorithms and keep the fastest (CUDA; results may differ between "
              "runs in the last bits)")
    general.add_argument("--seed", type=int, default=0, help="base seed; run r and client i derive their own")
    general.add_argument("--dataset_dir", default=DATASET_DIR)
    general.add_argument("--results_dir", default=RESULTS_DIR)

    general.add_argument("--shots", type=int, default=0,
                         help="keep only this many training samples per class on each client "
                              "(N-way K-shot, the paper's cloud-edge setting; 0: all)")

    local = p.add_argument_group("local training")
    local.add_argument("-lbs", "--batch_size", type=int, default=10)
    local.add_argument("-lr", "--local_learning_rate", type=float, default=0.01)
    bool_flag(local, "-ld", "--learning_rate_decay", False, "decay each client's lr every round")
    local.add_argument("-ldg", "--learning_rate_decay_gamma", type=float, default=0.99)
    local.add_argument("-ls", "--local_epochs", type=int, default=1)

    sim = p.add_argument_group("simulated system heterogeneity")
    sim.add_argument("-cdr", "--client_drop_rate", type=float, default=0.0,
                     help="fraction of the trained clients whose upload is lost each round")
    sim.add_argument("-tsr", "--train_slow_rate", type=float, default=0.0,
                     help="fraction of clients that train fewer local epochs")
    sim.add_argument("-ssr", "--send_slow_rate", type=float, default=0.0,
                     help="fraction of clients with a simulated upload delay")
    bool_flag(sim, "-ts", "--time_select", False, "drop uploads whose simulated time exceeds -tth")
    sim.add_argument("-tth", "--time_threshold", type=float, default=10000.0, help="seconds")

    shared = p.add_argument_group(
        "server training and regularizer weights (shared by several algorithms)",
        "each algorithm reads them its own way; defaults: FedKTL the generator's values from the paper, FedDistill "
        "-lam 1, FedProto and FedTGP -lam 10, FedGH -slr 0.01, FedTGP -slr = -lr")
    shared.add_argument("-lam", "--lamda", type=float, default=None,
                        help="FedKTL: weight of the centroid term; FedDistill, FedProto, FedTGP: their regularizer's "
                             "weight; default: each algorithm's value from its paper or the reference library")
    shared.add_argument("-slr", "--server_learning_rate", type=float, default=None,
                        help="FedKTL, FedGH, FedTGP: learning rate of the server's training; default: the algorithm's")
    shared.add_argument("-se", "--server_epochs", type=int, default=100,
                        help="FedKTL, FedGH, FedTGP: server training epochs per round; FedGen: generator steps")

    for owner in hook_owners("add_flags"):
        owner.add_flags(p)
    return p


def validate(args):
    checks = [
        (0.0 < args.join_ratio <= 1.0, f"-jr must be in (0, 1], got {args.join_ratio}"),
        (0.0 <= args.client_drop_rate < 1.0, f"-cdr must be in [0, 1), got {args.client_drop_rate}"),
        (0.0 <= args.train_slow_rate <= 1.0, f"-tsr must be in [0, 1], got {args.train_slow_rate}"),
        (0.0 <= args.send_slow_rate <= 1.0, f"-ssr must be in [0, 1], got {args.send_slow_rate}"),
        (args.num_clients >= 1, f"-nc must be at least 1, got {args.num_clients}"),
        (args.num_classes >= 2, f"-nb must be at least 2, got {args.num_classes}"),
        (args.global_rounds >= 0, f"-gr must be >= 0, got {args.global_rounds}"),
        (args.eval_gap >= 1, f"-eg must be >= 1, got {args.eval_gap}"),
        (args.batch_size >= 1, f"-lbs must be >= 1, got {args.batch_size}"),
        (args.local_epochs >= 1, f"-ls must be >= 1, got {args.local_epochs}"),
        (args.local_learning_rate > 0, f"-lr must be > 0, got {args.local_learning_rate}"),
        (args.feature_dim >= 1, f"-fd must be >= 1, got {args.feature_dim}"),
        (args.times >= 1, f"-t must be >= 1, got {args.times}"),
        (0 <= args.prev < args.times, f"-pv must be in [0, -t), got {args.prev}"),
        (args.shots >= 0, f"--shots must be >= 0, got {args.shots}"),
        (args.num_threads >= 0, f"--num_threads must be >= 0, got {args.num_threads}"),
        (args.parallel_clients >= 1, f"-pc must be >= 1 (1: one client at a time), got {args.parallel_clients}"),
        (args.top_cnt >= 1, f"-tc must be >= 1, got {args.top_cnt}"),
        (args.server_epochs >= 1, f"-se must be >= 1, got {args.server_epochs}"),
        (not args.resume or args.save_folder_name, "--resume needs -sfn DIR, the folder holding the checkpoints"),
    ]
    raise_first_failed(checks)
    for owner in hook_owners("check_flags", server_class(args.algorithm)):
        owner.check_flags(args)
    return args


def raise_first_failed(checks):
    """checks: (condition, message) pairs; raises UserError with the message of the first false condition."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def flag_or_default(value, default, flag, *, at_least=None, above=None):
    """An algorithm's weight or rate: the flag's value when given (not None), else the algorithm's default; either
    way checked against the bound, with a one-line error naming the flag."""
    chosen = default if value is None else value
    if at_least is not None and not chosen >= at_least:
        raise UserError(f"{flag} must be >= {at_least}, got {chosen}")
    if above is not None and not chosen > above:
        raise UserError(f"{flag} must be > {above}, got {chosen}")
    return chosen


def hook_owners(hook, *classes):
    """The server classes that define `hook` (add_flags or check_flags) in their own body, parents first, each
    once: among `classes` and their parents, or every registered algorithm's when none are given. Calling the hook
    on each runs every class's own declaration once, never a parent's twice through a child that lacks one."""
    owners = []
    for cls in classes or server_classes():
        for klass in reversed(cls.__mro__):
            if hook in vars(klass) and klass not in owners:
                owners.append(klass)
    return owners


def parse_args(argv=None):
    return validate(build_parser().parse_args(argv))
