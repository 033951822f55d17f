"""Command-line flags of main.py: the reference library's short names, plus a few of our own."""
import argparse

from flutils.errors import UserError
from flutils.paths import DATASET_DIR, RESULTS_DIR

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


def _bool_flag(parser, short, long, default, help_text):
    parser.add_argument(short, long, type=str2bool, nargs="?", const=True, default=default,
                        metavar="0|1", help=help_text)


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
    _bool_flag(general, "-rjr", "--random_join_ratio", False,
               "draw the number of joining clients each round between jr*N and N")
    general.add_argument("-t", "--times", type=int, default=1, help="independent runs, each with its own seed")
    general.add_argument("-pv", "--prev", type=int, default=0, help="index of the first run (to add runs later)")
    general.add_argument("-eg", "--eval_gap", type=int, default=1, help="evaluate every this many rounds")
    _bool_flag(general, "-ab", "--auto_break", False, "stop when accuracy has not improved for -tc evaluations")
    general.add_argument("-tc", "--top_cnt", type=int, default=100)
    general.add_argument("-sfn", "--save_folder_name", default="",
                         help="folder for per-round checkpoints (none when empty)")
    general.add_argument("--resume", action="store_true",
                         help="continue each run from its last checkpoint in -sfn")
    general.add_argument("--num_threads", type=int, default=0,
                         help="CPU threads for torch (0: torch's default)")
    general.add_argument("--seed", type=int, default=0, help="base seed; run r and client i derive their own")
    general.add_argument("--dataset_dir", default=DATASET_DIR)
    general.add_argument("--results_dir", default=RESULTS_DIR)

    general.add_argument("--shots", type=int, default=0,
                         help="keep only this many training samples per class on each client "
                              "(N-way K-shot, the paper's cloud-edge setting; 0: all)")

    local = p.add_argument_group("local training")
    local.add_argument("-lbs", "--batch_size", type=int, default=10)
    local.add_argument("-lr", "--local_learning_rate", type=float, default=0.01)
    _bool_flag(local, "-ld", "--learning_rate_decay", False, "decay each client's lr every round")
    local.add_argument("-ldg", "--learning_rate_decay_gamma", type=float, default=0.99)
    local.add_argument("-ls", "--local_epochs", type=int, default=1)

    sim = p.add_argument_group("simulated system heterogeneity")
    sim.add_argument("-cdr", "--client_drop_rate", type=float, default=0.0,
                     help="fraction of the trained clients whose upload is lost each round")
    sim.add_argument("-tsr", "--train_slow_rate", type=float, default=0.0,
                     help="fraction of clients that train fewer local epochs")
    sim.add_argument("-ssr", "--send_slow_rate", type=float, default=0.0,
                     help="fraction of clients with a simulated upload delay")
    _bool_flag(sim, "-ts", "--time_select", False, "drop uploads whose simulated time exceeds -tth")
    sim.add_argument("-tth", "--time_threshold", type=float, default=10000.0, help="seconds")

    ktl = p.add_argument_group("FedKTL server")
    ktl.add_argument("-slr", "--server_learning_rate", type=float, default=None,
                     help="default: the generator's value from the paper")
    ktl.add_argument("-sbs", "--server_batch_size", type=int, default=100)
    ktl.add_argument("-se", "--server_epochs", type=int, default=100)
    ktl.add_argument("-lam", "--lamda", type=float, default=None,
                     help="FedKTL: weight of the centroid term; other algorithms: their regularizer's weight; "
                          "default: each algorithm's value from its paper or the reference library")
    ktl.add_argument("-mu", "--mu", type=float, default=None,
                     help="weight of the knowledge-transfer task; default: the generator's value")
    ktl.add_argument("-GPath", "--generator_path", default="",
                     help="generator pickle ({'G_ema': G}), DCGAN checkpoint ({'netG_state_dict': ...}) or diffusers "
                          "folder; empty: the generator chosen by -gen")
    ktl.add_argument("-gen", "--generator", default="face-dcgan", choices=["face-dcgan", "untrained"],
                     help="FedKTL-stylegan-* without -GPath: the pre-trained face DCGAN of gan-face-generate "
                          "(falls back to untrained when it is not installed) or the untrained built-in generator")
    _bool_flag(ktl, "-lrs", "--latent_rescale", True,
               "Gaussian-prior generators (DCGAN, Stable Diffusion): move each class centroid to the prior's typical "
               "norm before rendering it and sending it as q (0: render the class mean as it is, the paper)")
    ktl.add_argument("--kt_norm", default="keep", choices=["update", "keep", "aux"],
                     help="BatchNorm in the client's forward of generated images: 'update' lets them update the "
                          "running statistics (the original code), 'keep' normalizes them with their batch "
                          "statistics but leaves the running ones alone, 'aux' gives them their own BatchNorm "
                          "affine parameters and statistics (auxiliary BN); no effect on models without BatchNorm")
    ktl.add_argument("-gbs", "--gen_batch_size", type=int, default=4)
    ktl.add_argument("-prompt", "--stable_diffusion_prompt", default="a cat")
    ktl.add_argument("--sd_steps", type=int, default=50, help="Stable Diffusion: denoising steps per image")
    ktl.add_argument("--sd_guidance", type=float, default=7.5,
                     help="Stable Diffusion: classifier-free guidance scale (<= 1: no guidance)")
    ktl.add_argument("--sd_negative_prompt", default="", help="Stable Diffusion: negative prompt for guidance")
    ktl.add_argument("--sd_dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                     help="Stable Diffusion weights on CUDA (auto: float16); the CPU always uses float32")
    ktl.add_argument("--sd_resolution", type=int, default=0,
                     help="Stable Diffusion: image side in pixels, a multiple of 8 (0: the model's own, 512 for "
                          "v1.5); lower is faster and shrinks the latent")
    _bool_flag(ktl, "-sdas", "--sd_attention_slicing", False, "Stable Diffusion: attention slicing (less GPU memory)")
    _bool_flag(ktl, "-sdvt", "--sd_vae_tiling", False, "Stable Diffusion: tiled VAE decoding (less GPU memory)")
    ktl.add_argument("--image_every", type=int, default=1,
                     help="save the generated image grid every this many rounds (0: never)")
    ablation = p.add_argument_group("FedKTL ablations and the original code's behaviour (defaults: the paper)")
    _bool_flag(ablation, "-etf", "--etf", True, "ETF classifier (0: a plain linear head with cross-entropy)")
    ablation.add_argument("-margin", "--margin", type=float, default=0.5,
                          help="angular margin m of the ETF loss (0: no margin)")
    ablation.add_argument("--margin_warmup", type=int, default=0,
                          help="raise the margin linearly from 0 to -margin over this many rounds (0: full from the "
                               "start, the paper)")
    ablation.add_argument("--client_grad_clip", type=float, default=100.0,
                          help="FedKTL clients: gradient-norm clip (the paper's code: 100; 0: none)")
    _bool_flag(ablation, "-ft", "--feature_transformer", True,
               "train the feature transformer F (0: a fixed random linear map)")
    _bool_flag(ablation, "-mmd", "--mmd", True, "the MMD term of domain alignment")
    _bool_flag(ablation, "-cr", "--centroid_reset", True,
               "reset the centroids to class means of F(P) before and after alignment (the original: no effect)")
    _bool_flag(ablation, "-rp", "--reset_proj", False,
               "re-initialize each client's proj from the server's copy every round (the original's behaviour)")
    transfer = p.add_argument_group("FedKTL knowledge-transfer task (defaults: the paper; see the README's ablations)")
    transfer.add_argument("--kt_pairs_per_class", type=int, default=1,
                          help="image-vector pairs rendered per class each round: the centroid and N - 1 latents "
                               "around it (1: the centroid only, the paper)")
    transfer.add_argument("--kt_pair_spread", type=float, default=0.3,
                          help="where the extra latents of a class lie: (1 - s) * centroid + s * a fresh valid "
                               "latent, made renderable (0: copies of the centroid, 1: unrelated valid latents)")
    _bool_flag(transfer, "-kfn", "--kt_feature_norm", False,
               "proj reads L2-normalized features of the generated images, so the task cannot pull on the feature "
               "norm (0: raw features, the paper)")
    transfer.add_argument("--mu_warmup", type=int, default=0,
                          help="raise mu linearly from 0 over this many rounds (0: full mu from the start, the paper)")
    _bool_flag(transfer, "-kbg", "--kt_base_grad", True,
               "the transfer loss trains the feature extractor (0: only proj learns it; a diagnostic of how much of "
               "the task proj absorbs)")
    _bool_flag(transfer, "-kdiag", "--kt_diagnostics", False,
               "record, at every client step, the norms and cosine of the classification and the mu-weighted "
               "transfer gradients on the feature extractor (two extra backward passes; results unchanged)")
    baselines_a = p.add_argument_group("baselines (FedDistill, FML, LG-FedAvg, FedGen)",
                                       "FedDistill's weight is -lam (default 1); FedGen trains -se steps per round")
    baselines_a.add_argument("-al", "--alpha", type=float, default=0.5,
                             help="FML: private model's loss = alpha * CE + (1 - alpha) * KL (the FML paper)")
    baselines_a.add_argument("-bt", "--beta", type=float, default=0.5,
                             help="FML: shared model's loss = beta * CE + (1 - beta) * KL (the FML paper)")
    baselines_a.add_argument("--fml_model", default="cnn4",
                             help="FML: registry name of the shared model, built at -fd")
    baselines_a.add_argument("-nd", "--noise_dim", type=int, default=512, help="FedGen: generator noise size")
    baselines_a.add_argument("-hd", "--hidden_dim", type=int, default=512, help="FedGen: generator hidden width")
    baselines_a.add_argument("-glr", "--generator_learning_rate", type=float, default=0.005,
                             help="FedGen: Adam learning rate of the server's generator")
    baselines_b = p.add_argument_group(
        "baselines (FedProto, FedKD, FedGH, FedTGP)",
        "-lam defaults to 10 for FedProto and FedTGP; -slr to 0.01 for FedGH and to -lr for FedTGP; FedGH and "
        "FedTGP train on the server for -se epochs in batches of -lbs (the reference library's choices)")
    baselines_b.add_argument("-mlr", "--mentee_learning_rate", type=float, default=0.01,
                             help="FedKD: learning rate of the shared mentee (the reference library)")
    baselines_b.add_argument("-Ts", "--T_start", type=float, default=0.95,
                             help="FedKD: SVD energy kept in the first round (the reference library)")
    baselines_b.add_argument("-Te", "--T_end", type=float, default=0.98,
                             help="FedKD: SVD energy kept at the end (the reference library)")
    baselines_b.add_argument("--mentee_model", default="cnn4",
                             help="FedKD: registry name of the shared mentee, built at -fd")
    baselines_b.add_argument("-mart", "--margin_threshold", type=float, default=100.0,
                             help="FedTGP: upper bound of the adaptive margin (the reference library)")
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
        (args.top_cnt >= 1, f"-tc must be >= 1, got {args.top_cnt}"),
        (args.server_batch_size >= 2, f"-sbs must be >= 2 (BatchNorm needs 2 samples), got {args.server_batch_size}"),
        (args.server_epochs >= 1, f"-se must be >= 1, got {args.server_epochs}"),
        (args.gen_batch_size >= 1, f"-gbs must be >= 1, got {args.gen_batch_size}"),
        (args.margin >= 0, f"--margin must be >= 0, got {args.margin}"),
        (args.margin_warmup >= 0, f"--margin_warmup must be >= 0, got {args.margin_warmup}"),
        (args.kt_pairs_per_class >= 1, f"--kt_pairs_per_class must be >= 1, got {args.kt_pairs_per_class}"),
        (0.0 <= args.kt_pair_spread <= 1.0, f"--kt_pair_spread must be in [0, 1], got {args.kt_pair_spread}"),
        (args.mu is None or args.mu >= 0, f"-mu must be >= 0, got {args.mu}"),
        (args.mu_warmup >= 0, f"--mu_warmup must be >= 0, got {args.mu_warmup}"),
        (args.client_grad_clip >= 0, f"--client_grad_clip must be >= 0 (0: no clip), got {args.client_grad_clip}"),
        (args.image_every >= 0, f"--image_every must be >= 0, got {args.image_every}"),
        (not args.resume or args.save_folder_name, "--resume needs -sfn DIR, the folder holding the checkpoints"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return args


def parse_args(argv=None):
    return validate(build_parser().parse_args(argv))
