"""FedKTL end to end: the knowledge-transfer task, generated pairs, communication counts, checkpoints."""
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from compact_stylegan import CompactGenerator
from flcore.ktl_ops import arc_margin_loss, etf_cosines
from flcore.servers.serverktl import to_client_images
from flcore.servers.serverktl_stylegan_3 import ServerKTLStyleGAN3
from flcore.servers.serverktl_stylegan_xl import ServerKTLStyleGANXL
from flutils import experiment
from flutils.data import load_federated_dataset
from flutils.errors import UserError
from flutils.options import parse_args
from flutils.results import read_h5
from generator_io import save_generator_pickle

MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "system", "main.py")
FAST_SERVER = ["-se", "5", "-sbs", "8"]


def results_dir(argv):
    return argv[argv.index("--results_dir") + 1]


def make_server(small_run, *extra, cls=ServerKTLStyleGAN3):
    args = parse_args(small_run("-algo", "FedKTL-stylegan-3", *FAST_SERVER, *extra))
    return cls(args, load_federated_dataset(args), 0, torch.device("cpu"))


def test_generated_pairs_have_client_shape_and_normalization(small_run):
    server = make_server(small_run, "-gen", "untrained")
    server.server_round(server.clients, server_timer(server))
    images, latents = server.pair_images, server.pair_latents
    assert images.shape == (10, 3, 32, 32) and latents.shape == (10, server.image_generator.latent_dim)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert torch.equal(latents, server.centroids.detach()), "W latents are sent as they are (the paper)"


def server_timer(server):
    from flcore.servers.serverbase import PhaseTimer
    return PhaseTimer(server.phases, server.device)


@pytest.mark.parametrize("source,target", [((3, 64, 64), (1, 28, 28)), ((1, 32, 32), (3, 32, 32)),
                                           ((3, 32, 32), (3, 64, 64))])
def test_to_client_images_matches_shape_and_range(source, target):
    images = torch.rand(2, *source) * 2 - 1
    out = to_client_images(images, target)
    assert out.shape == (2, *target) and out.min() >= -1 and out.max() <= 1


def test_to_client_images_keeps_a_constant_image_constant():
    images = torch.full((1, 3, 64, 64), 0.25)
    assert torch.allclose(to_client_images(images, (3, 32, 32)), torch.full((1, 3, 32, 32), 0.25), atol=1e-6)


def fixed_batch(client):
    return client.to_device(client.train_x[:8], client.train_y[:8])


@pytest.mark.parametrize("mu", ["50", "0"])
def test_knowledge_transfer_loss_starts_in_round_one(small_run, mu):
    server = make_server(small_run, "-mu", mu)
    client = server.clients[0]
    x, y = fixed_batch(client)
    client.model.eval()
    margin_only = arc_margin_loss(etf_cosines(client.model(x), client.etf), y).item()
    assert client.training_loss(x, y).item() == pytest.approx(margin_only, rel=1e-6), "round 0 has no pairs"

    server.server_round(server.clients, server_timer(server))
    server.send(server.clients)
    with_pairs = client.training_loss(x, y).item()
    if mu == "0":
        assert with_pairs == pytest.approx(margin_only, rel=1e-6)
    else:
        images, latents = client.pair_images, client.pair_latents
        transfer = torch.nn.functional.mse_loss(client.proj(client.model.base(images)), latents).item()
        assert transfer > 0 and with_pairs > margin_only


def test_clients_get_proj_once_and_count_downloads(small_run):
    server = make_server(small_run)
    server.server_round(server.clients, server_timer(server))
    server.download_floats = 0
    server.send(server.clients[:2])
    latent = server.image_generator.latent_dim
    pairs = 10 * 3 * 32 * 32 + 10 * latent
    proj = 64 * latent + latent
    assert server.download_floats == 2 * (pairs + proj)
    assert torch.equal(server.clients[0].proj.weight, server.proj.weight)
    server.download_floats = 0
    server.send(server.clients[:3])
    assert server.download_floats == 3 * pairs + proj


def test_three_rounds_end_to_end(small_run):
    argv = small_run("-algo", "FedKTL-stylegan-3", "-gr", "3", *FAST_SERVER)
    assert experiment.main(argv) == 0
    data = read_h5(os.path.join(results_dir(argv), "Digits_FedKTL-stylegan-3_test_0.h5"))
    assert data["rs_test_acc"].max() > 0.2, "FedKTL should beat chance (0.1) on label-skewed Digits"
    assert {"align_mmd", "align_centroid", "time_align", "time_generate", "time_prototypes"} <= set(data)
    assert len(data["align_mmd"]) == 3 and np.all(np.isfinite(data["align_mmd"]))

    dataset = load_federated_dataset(parse_args(argv))
    classes_per_client = [len(torch.unique(c.train_y)) for c in dataset.clients]
    assert np.all(data["upload_floats"] == sum(classes_per_client) * 10), "prototypes: K floats per local class"
    assert data["download_floats"][0] == 0, "nothing to send before the first round's generation"
    assert data["download_floats"][2] < data["download_floats"][1], "proj is sent once per client"
    grid = os.path.join(results_dir(argv), "Digits_FedKTL-stylegan-3_test_0_images", "round_0002.png")
    assert os.path.isfile(grid)


def test_stylegan_xl_uses_class_labels(small_run):
    server = make_server(small_run, "-gen", "untrained", cls=ServerKTLStyleGANXL)
    adapter = server.image_generator
    assert adapter.G.c_dim > 0
    generator = torch.Generator().manual_seed(0)
    labels = adapter.labels(6, generator)
    assert labels.shape == (6, adapter.G.c_dim) and torch.all(labels.sum(1) == 1)
    assert server.lam == 1.0 and server.mu == 50.0


def test_stylegan_xl_rejects_an_unconditional_pickle(small_run, tmp_path):
    path = tmp_path / "g.pkl"
    save_generator_pickle(CompactGenerator(z_dim=16, w_dim=16, img_resolution=8), str(path))
    with pytest.raises(UserError, match="FedKTL-stylegan-3"):
        make_server(small_run, "-GPath", str(path), cls=ServerKTLStyleGANXL)


def test_generator_pickle_is_used_by_the_server(small_run, tmp_path):
    torch.manual_seed(0)
    G = CompactGenerator(z_dim=32, w_dim=48, img_resolution=16)
    path = tmp_path / "g.pkl"
    save_generator_pickle(G, str(path))
    server = make_server(small_run, "-GPath", str(path))
    assert server.image_generator.latent_dim == 48
    ws = torch.randn(2, 48)
    expected = G.synthesis(ws.unsqueeze(1).repeat(1, G.num_ws, 1), noise_mode="const")
    assert torch.allclose(server.image_generator.render(ws), expected, atol=1e-6)


def run_cli(argv, **kwargs):
    return subprocess.run([sys.executable, MAIN, *argv], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.parametrize("content,fragment", [(None, "not found"), (b"plain text", "pickle"),
                                              ("dict", "G_ema")])
def test_bad_generator_path(small_run, tmp_path, content, fragment):
    path = tmp_path / "generator.pkl"
    if content == "dict":
        path.write_bytes(pickle.dumps({"G": 1}))
    elif content is not None:
        path.write_bytes(content)
    argv = small_run("-algo", "FedKTL-stylegan-3", "-gr", "1", "-GPath", str(path))
    proc = run_cli(argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0].lower() or fragment in lines[0]
    assert not os.path.exists(results_dir(argv))


def ktl_argv(small_run, checkpoints, rounds=3):
    # The same thread count in and out of process, so floating-point sums agree bit for bit.
    return small_run("-algo", "FedKTL-stylegan-3", "-gr", str(rounds), *FAST_SERVER, "-sfn", str(checkpoints),
                     "-jr", "0.75", "-cdr", "0.3", "--image_every", "0", "--num_threads", "1")


COMPARED = ("rs_test_acc", "rs_test_auc", "rs_train_loss", "upload_floats", "download_floats", "align_mmd",
            "align_centroid", "eval_rounds")


def test_resume_after_a_kill_between_rounds_equals_an_uninterrupted_run(small_run, tmp_path):
    reference = ktl_argv(small_run, tmp_path / "ck_ref")
    assert experiment.main(reference) == 0
    expected = read_h5(os.path.join(results_dir(reference), "Digits_FedKTL-stylegan-3_test_0.h5"))

    argv = ktl_argv(small_run, tmp_path / "ck")
    argv[argv.index("--results_dir") + 1] = str(tmp_path / "resumed")
    checkpoint = tmp_path / "ck" / "Digits_FedKTL-stylegan-3_test_0.pt"
    proc = subprocess.Popen([sys.executable, MAIN, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert checkpoint.exists(), "the run should have checkpointed its first round"
    assert not os.path.exists(tmp_path / "resumed" / "Digits_FedKTL-stylegan-3_test_0.h5"), "killed before the end"

    assert experiment.main(argv + ["--resume"]) == 0
    resumed = read_h5(os.path.join(tmp_path / "resumed", "Digits_FedKTL-stylegan-3_test_0.h5"))
    for key in COMPARED:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)


def test_resume_refuses_other_flags(small_run, tmp_path):
    argv = ktl_argv(small_run, tmp_path / "ck", rounds=1)
    assert experiment.main(argv) == 0
    changed = argv + ["--resume", "-lr", "0.5"]
    with pytest.raises(UserError, match="local_learning_rate"):
        experiment.run_experiment(parse_args(changed))


def test_checkpoint_write_is_atomic(small_run, tmp_path, monkeypatch):
    server = make_server(small_run, "-sfn", str(tmp_path / "ck"))
    server.save_checkpoint()
    path = server.checkpoint_path()
    before = open(path, "rb").read()

    def interrupted_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    server.round = 1
    with pytest.raises(KeyboardInterrupt):
        server.save_checkpoint()
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    fresh = make_server(small_run, "-sfn", str(tmp_path / "ck"), "--resume")
    assert fresh.resume() and fresh.round == 0


@pytest.mark.parametrize("eval_gap", ["1", "2"])
def test_a_finished_run_extended_with_more_rounds_equals_a_longer_run(small_run, tmp_path, eval_gap):
    longer = small_run("-algo", "FedKTL-stylegan-3", "-gr", "3", "-eg", eval_gap, *FAST_SERVER,
                       "--image_every", "0")
    assert experiment.main(longer) == 0
    expected = read_h5(os.path.join(results_dir(longer), "Digits_FedKTL-stylegan-3_test_0.h5"))

    short = longer + ["-sfn", str(tmp_path / "ck")]
    short[short.index("-gr") + 1] = "1"
    short[short.index("--results_dir") + 1] = str(tmp_path / "extended")
    assert experiment.main(short) == 0
    extended = list(short)
    extended[extended.index("-gr") + 1] = "3"
    assert experiment.main(extended + ["--resume"]) == 0
    resumed = read_h5(os.path.join(tmp_path / "extended", "Digits_FedKTL-stylegan-3_test_0.h5"))
    for key in COMPARED:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)
