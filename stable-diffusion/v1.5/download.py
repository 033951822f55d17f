"""Downloads Stable Diffusion v1.5 in the diffusers layout with huggingface_hub: only the parts FedKTL loads
(no safety checker), into this folder by default. Needs internet; fails at once when HF_HUB_OFFLINE is set.

    python stable-diffusion/v1.5/download.py [--out DIR] [--fp16] [--repo OWNER/NAME]
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class DownloadError(Exception):
    """Reported as one line on stderr."""


def wanted_files(fp16):
    """Hub file patterns of the diffusers layout; `fp16` picks the half-size `*.fp16.safetensors` weights."""
    variant = ".fp16" if fp16 else ""
    return ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
            "text_encoder/config.json", f"text_encoder/model{variant}.safetensors",
            "unet/config.json", f"unet/diffusion_pytorch_model{variant}.safetensors",
            "vae/config.json", f"vae/diffusion_pytorch_model{variant}.safetensors"]


def download(repo, out, fp16):
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: run pip install -r requirements.txt") from None
    if constants.HF_HUB_OFFLINE:
        raise DownloadError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded: run this where there is "
                            f"internet, or copy a diffusers Stable Diffusion folder to {out}")
    try:
        snapshot_download(repo, local_dir=out, allow_patterns=wanted_files(fp16))
    except Exception as exc:  # network, authentication and missing-repo errors all end the same way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DownloadError(f"downloading {repo} failed ({reason}); check the connection and --repo, then rerun "
                            f"(finished files are kept)") from None


def check_download(out):
    """The same completeness check as -GPath, so a repo in another layout is caught here."""
    from sd_pipelines.pipeline import PipelineFolderError, check_folder
    try:
        check_folder(out)
    except PipelineFolderError as exc:
        raise DownloadError(str(exc)) from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=HERE, help="target folder (pass it to main.py as -GPath)")
    parser.add_argument("--fp16", action="store_true", help="half-size fp16 weights (about 2.1 GB instead of 4.3 GB)")
    parser.add_argument("--repo", default=DEFAULT_REPO, help="Hugging Face repository in the diffusers layout")
    args = parser.parse_args(argv)
    try:
        download(args.repo, args.out, args.fp16)
        check_download(args.out)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Stable Diffusion is in {args.out}; run with -algo FedKTL-stable-diffusion -GPath {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
