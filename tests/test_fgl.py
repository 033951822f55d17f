"""FGL: class-level prompts from the dataset's class names, the synthetic set Stable Diffusion renders from the
prompts clients sent, two rounds end to end with communication counted by hand, and its one-line errors."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from flcore.fedavg import shared_state
from flcore.fgl_ops import DEFAULT_TEMPLATE, class_prompts, pooled_prompts, prompt_upload, synthesize, train_on
from flcore.parameters import float_count
from flcore.trainmodel import build_model
from fldata.sources import CIFAR10, CIFAR100, DIGITS, FASHION_MNIST, FLOWERS102, MNIST
from flutils import experiment
from flutils.data import load_federated_dataset
from flutils.options import parse_args

K = 10
PER_CLASS = 3


@pytest.fixture(scope="module")
def pipeline(tiny_sd_pipeline):
    from sd_pipelines.pipeline import LatentsToImagePipeline
    return LatentsToImagePipeline.from_folder(tiny_sd_pipeline)


def fgl_argv(small_run, pipeline_folder, *extra, **where):
    return small_run("-algo", "FGL", "-m", "tiny_cnn", "-GPath", pipeline_folder, "--sd_steps", "2",
                     "--fgl_images_per_class", str(PER_CLASS), "--fgl_server_epochs", "2", "-gbs", "2", *extra,
                     **where)


def test_every_dataset_script_names_its_classes():
    for spec in (MNIST, FASHION_MNIST, CIFAR10, CIFAR100, FLOWERS102, DIGITS):
        assert len(spec.class_names) == spec.num_classes == len(set(spec.class_names)), spec.name
        assert all(name == name.strip() and name for name in spec.class_names), spec.name


def test_class_level_prompts_and_what_a_client_uploads(pipeline):
    names = ["cat", "dog", "bird"]
    prompts = class_prompts(names, DEFAULT_TEMPLATE)
    assert prompts[1] == "dog, real world images, high resolution"
    tokens = pipeline.tokenize(prompts)
    assert tokens.shape == (3, pipeline.tokenizer.model_max_length) and tokens.dtype == torch.long
    upload = prompt_upload(torch.tensor([0.0, 4.0, 2.0]), tokens)
    assert upload.tensors["classes"].tolist() == [1, 2]
    assert torch.equal(upload.tensors["prompt_tokens"].long(), tokens[1:])
    assert upload.floats() == 2 * tokens.shape[1], "the token ids are the upload"
    other = prompt_upload(torch.tensor([5.0, 0.0, 1.0]), tokens)
    pooled = pooled_prompts([upload, other])
    assert list(pooled) == [0, 1, 2] and all(torch.equal(pooled[c], tokens[c]) for c in pooled)


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32)])
def test_the_synthetic_set_has_the_requested_images_per_class_in_the_clients_format(pipeline, image_shape):
    tokens = pipeline.tokenize(class_prompts(["cat", "dog", "bird"], DEFAULT_TEMPLATE))
    prompts = {0: tokens[0], 2: tokens[2]}
    images, labels = synthesize(pipeline, prompts, 5, image_shape, pipeline.latent_shape(64), steps=2, guidance=7.5,
                                negative_prompt="", batch_size=2, rng=torch.Generator().manual_seed(0))
    assert images.shape == (10, *image_shape) and images.dtype == torch.float32
    assert torch.bincount(labels, minlength=3).tolist() == [5, 0, 5]
    # The clients' normalization (mean 0.5, std 0.5) puts pixels in [-1, 1]; the images are not constant.
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    again, _ = synthesize(pipeline, prompts, 5, image_shape, pipeline.latent_shape(64), steps=2, guidance=7.5,
                          negative_prompt="", batch_size=5, rng=torch.Generator().manual_seed(0))
    assert not torch.equal(images[:5], images[5:]), "each class is rendered from its own prompt and noise"
    assert again.shape == images.shape


def test_server_training_fits_the_synthetic_set():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", K, 16, 1, 16)
    images, labels = torch.randn(40, 1, 16, 16), torch.arange(40) % K
    first = train_on(model, images, labels, 1, 8, 0.05, 0.9, torch.Generator().manual_seed(0))
    last = train_on(model, images, labels, 30, 8, 0.05, 0.9, torch.Generator().manual_seed(0))
    assert last < 0.5 * first


def test_fgl_two_rounds_end_to_end(small_run, tiny_sd_pipeline, pipeline, results_of):
    argv = fgl_argv(small_run, tiny_sd_pipeline, "-gr", "2")
    assert experiment.main(argv) == 0
    data = results_of(argv)
    held = [set(torch.unique(c.train_y).tolist()) for c in load_federated_dataset(parse_args(argv).run).clients]
    model_floats = float_count(shared_state(build_model("tiny_cnn", K, 64, 3, 32)))
    prompt_length = pipeline.tokenizer.model_max_length
    # Round 0: each client sends one prompt (L token ids) per class it holds and receives nothing; round 1: FedAvg.
    assert data["upload_floats"].tolist() == [sum(map(len, held)) * prompt_length, 4 * model_floats]
    assert data["download_floats"].tolist() == [0, 4 * model_floats]
    assert data["synthetic_images"].tolist() == [PER_CLASS * len(set().union(*held)), 0]
    assert np.isfinite(data["server_train_loss"][0]) and np.isnan(data["server_train_loss"][1])
    assert data["rs_test_acc"].shape == (3,)


def without_class_names(digits_root, tmp_path):
    folder = tmp_path / "Digits"
    shutil.copytree(os.path.join(digits_root, "Digits"), folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    del config["class_names"]
    config_path.write_text(json.dumps(config))
    return str(tmp_path)


def test_fgl_errors(small_run, tiny_sd_pipeline, digits_root, tmp_path, error_line):
    no_path = small_run("-algo", "FGL", "-m", "tiny_cnn")
    assert "-algo FGL needs -GPath <diffusers Stable Diffusion folder>" in error_line(experiment.main, no_path)
    not_a_pipeline = fgl_argv(small_run, str(tmp_path))
    assert "has no model_index.json" in error_line(experiment.main, not_a_pipeline)
    unnamed = fgl_argv(small_run, tiny_sd_pipeline, dataset_dir=without_class_names(digits_root, tmp_path))
    line = error_line(experiment.main, unnamed)
    assert "class names" in line and '"class_names"' in line and "generate_" in line
    bad_template = fgl_argv(small_run, tiny_sd_pipeline, "--fgl_prompt_template", "a photo")
    assert "--fgl_prompt_template" in error_line(experiment.main, bad_template)
