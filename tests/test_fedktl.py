"""FedKTL end to end: the knowledge-transfer task, generated pairs, communication counts, generator files."""
import os
import pickle

import numpy as np
import pytest
import torch

from compact_stylegan import CompactGenerator
from flcore.ktl_ops import arc_margin_loss, etf_cosines
from flcore.images import to_client_images
from flutils import experiment
from flutils.data import load_federated_dataset
from flcore.errors import UserError
from flutils.options import parse_args
from generator_io import save_generator_pickle

FAST_SERVER = ["-se", "5", "-sbs", "8"]


def test_generated_pairs_have_client_shape_and_normalization(make_server, round_timer):
    server = make_server("FedKTL-stylegan-3", *FAST_SERVER, "-gen", "untrained")
    server.exchange(server.clients, round_timer(server))
    images, latents = server.algorithm.pair_images, server.algorithm.pair_latents
    assert images.shape == (10, 3, 32, 32) and latents.shape == (10, server.algorithm.image_generator.latent_dim)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert torch.equal(latents, server.algorithm.centroids.detach()), "W latents are sent as they are (the paper)"


@pytest.mark.parametrize("source,target", [((3, 64, 64), (1, 28, 28)), ((1, 32, 32), (3, 32, 32)),
                                           ((3, 32, 32), (3, 64, 64))])
def test_to_client_images_matches_shape_and_range(source, target):
    images = torch.rand(2, *source) * 2 - 1
    out = to_client_images(images, target)
    assert out.shape == (2, *target) and out.min() >= -1 and out.max() <= 1


def test_to_client_images_keeps_a_constant_image_constant():
    images = torch.full((1, 3, 64, 64), 0.25)
    assert torch.allclose(to_client_images(images, (3, 32, 32)), torch.full((1, 3, 32, 32), 0.25), atol=1e-6)


@pytest.mark.parametrize("mu", ["50", "0"])
def test_knowledge_transfer_loss_starts_in_round_one(make_server, round_timer, fixed_batch, mu):
    server = make_server("FedKTL-stylegan-3", *FAST_SERVER, "-mu", mu)
    client = server.clients[0]
    x, y = fixed_batch(client)
    client.model.eval()
    margin_only = arc_margin_loss(etf_cosines(client.model(x), client.etf), y).item()
    assert client.training_loss(x, y).item() == pytest.approx(margin_only, rel=1e-6), "round 0 has no pairs"

    server.exchange(server.clients, round_timer(server))
    server.send(server.clients)
    with_pairs = client.training_loss(x, y).item()
    if mu == "0":
        assert with_pairs == pytest.approx(margin_only, rel=1e-6)
    else:
        images, latents = client.pair_images, client.pair_latents
        transfer = torch.nn.functional.mse_loss(client.proj(client.model.base(images)), latents).item()
        assert transfer > 0 and with_pairs > margin_only


def test_clients_get_proj_once_and_count_downloads(make_server, round_timer):
    server = make_server("FedKTL-stylegan-3", *FAST_SERVER)
    server.exchange(server.clients, round_timer(server))
    server.download_floats = 0
    server.send(server.clients[:2])
    latent = server.algorithm.image_generator.latent_dim
    pairs = 10 * 3 * 32 * 32 + 10 * latent
    proj = 64 * latent + latent
    assert server.download_floats == 2 * (pairs + proj)
    assert torch.equal(server.clients[0].proj.weight, server.algorithm.proj.weight)
    server.download_floats = 0
    server.send(server.clients[:3])
    assert server.download_floats == 3 * pairs + proj


def test_three_rounds_end_to_end(small_run, results_dir, results_of):
    argv = small_run("-algo", "FedKTL-stylegan-3", "-gr", "3", *FAST_SERVER)
    assert experiment.main(argv) == 0
    data = results_of(argv)
    assert data["rs_test_acc"].max() > 0.2, "FedKTL should beat chance (0.1) on label-skewed Digits"
    assert {"align_mmd", "align_centroid", "time_align", "time_generate", "time_prototypes"} <= set(data)
    assert len(data["align_mmd"]) == 3 and np.all(np.isfinite(data["align_mmd"]))

    dataset = load_federated_dataset(parse_args(argv).run)
    classes_per_client = [len(torch.unique(c.train_y)) for c in dataset.clients]
    assert np.all(data["upload_floats"] == sum(classes_per_client) * 10), "prototypes: K floats per local class"
    assert data["download_floats"][0] == 0, "nothing to send before the first round's generation"
    assert data["download_floats"][2] < data["download_floats"][1], "proj is sent once per client"
    grid = os.path.join(results_dir(argv), "Digits_FedKTL-stylegan-3_test_0_images", "round_0002.png")
    assert os.path.isfile(grid)


def test_stylegan_xl_uses_class_labels(make_server):
    server = make_server("FedKTL-stylegan-xl", *FAST_SERVER, "-gen", "untrained")
    adapter = server.algorithm.image_generator
    assert adapter.G.c_dim > 0
    generator = torch.Generator().manual_seed(0)
    labels = adapter.labels(6, generator)
    assert labels.shape == (6, adapter.G.c_dim) and torch.all(labels.sum(1) == 1)
    assert server.algorithm.settings.lamda == 1.0 and server.algorithm.settings.mu == 50.0


def test_stylegan_xl_rejects_an_unconditional_pickle(make_server, tmp_path):
    path = tmp_path / "g.pkl"
    save_generator_pickle(CompactGenerator(z_dim=16, w_dim=16, img_resolution=8), str(path))
    with pytest.raises(UserError, match="FedKTL-stylegan-3"):
        make_server("FedKTL-stylegan-xl", *FAST_SERVER, "-GPath", str(path))


def test_generator_pickle_is_used_by_the_server(make_server, tmp_path):
    torch.manual_seed(0)
    G = CompactGenerator(z_dim=32, w_dim=48, img_resolution=16)
    path = tmp_path / "g.pkl"
    save_generator_pickle(G, str(path))
    server = make_server("FedKTL-stylegan-3", *FAST_SERVER, "-GPath", str(path))
    assert server.algorithm.image_generator.latent_dim == 48
    ws = torch.randn(2, 48)
    expected = G.synthesis(ws.unsqueeze(1).repeat(1, G.num_ws, 1), noise_mode="const")
    assert torch.allclose(server.algorithm.image_generator.render(ws), expected, atol=1e-6)


@pytest.mark.parametrize("content,fragment", [(None, "not found"), (b"plain text", "pickle"),
                                              ("dict", "G_ema")])
def test_bad_generator_path(small_run, tmp_path, results_dir, error_line, content, fragment):
    path = tmp_path / "generator.pkl"
    if content == "dict":
        path.write_bytes(pickle.dumps({"G": 1}))
    elif content is not None:
        path.write_bytes(content)
    argv = small_run("-algo", "FedKTL-stylegan-3", "-gr", "1", "-GPath", str(path), "-sfn", str(tmp_path / "ck"))
    assert fragment in error_line(experiment.main, argv)
    assert not os.path.exists(results_dir(argv)) and not os.path.exists(tmp_path / "ck")
