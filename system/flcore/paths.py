"""Where the project's folders are: every default path is derived from the repository root here."""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASET_DIR = os.path.join(REPO_ROOT, "dataset")
RESULTS_DIR = os.path.join(REPO_ROOT, "results")
STYLEGAN_DIR = os.path.join(REPO_ROOT, "stylegan")
STABLE_DIFFUSION_DIR = os.path.join(REPO_ROOT, "stable-diffusion")
