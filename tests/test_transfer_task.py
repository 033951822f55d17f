"""The knowledge-transfer task's switches: pairs per class, normalized features, mu warm-up, the transfer
gradient stopped at proj, and the gradient diagnostics (flcore/clients/clientktl.py, servers/serverktl.py)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from flcore.servers.serverktl import centroid_shift
from flcore.errors import UserError
from flutils.options import parse_args

FAST_SERVER = ["-se", "2", "-sbs", "8", "-gen", "untrained"]


@pytest.fixture
def server_with_pairs(make_server, round_timer):
    """server_with_pairs(*flags): a FedKTL server in round 1 whose clients hold the pairs of round 0."""
    def build(*flags):
        server = make_server("FedKTL-stylegan-3", *FAST_SERVER, *flags)
        server.exchange(server.clients, round_timer(server))
        server.round = server.algorithm.round = 1
        server.send(server.clients)
        return server
    return build


def test_pairs_per_class_sends_the_centroids_first_then_latents_around_them(server_with_pairs):
    server = server_with_pairs("--kt_pairs_per_class", "3")
    k, latent = server.algorithm.num_classes, server.algorithm.image_generator.latent_dim
    assert server.algorithm.pair_latents.shape == (3 * k, latent) and server.algorithm.pair_images.shape[0] == 3 * k
    assert torch.equal(server.algorithm.pair_latents[:k], server.algorithm.centroids.detach()), \
        "rows 0..K-1: the class centroids"
    assert len(server.clients[0].pair_latents) == 3 * k
    # StyleGAN's W latents are rendered as they are, so each extra latent is 0.7 c + 0.3 w with w a valid latent.
    extra = server.algorithm.pair_latents[k:].view(2, k, latent)
    mixed_in = (extra - 0.7 * server.algorithm.centroids.detach()) / 0.3
    assert mixed_in.norm(dim=2).mean().item() == pytest.approx(server.algorithm.valid_latent_norm, rel=0.1)
    assert torch.cdist(mixed_in[0], mixed_in[1]).diagonal().min() > 1, "a fresh valid latent for every pair"


def test_pair_spread_zero_repeats_the_centroids(server_with_pairs):
    server = server_with_pairs("--kt_pairs_per_class", "2", "--kt_pair_spread", "0")
    k = server.algorithm.num_classes
    assert torch.equal(server.algorithm.pair_latents[k:], server.algorithm.pair_latents[:k])
    assert torch.allclose(server.algorithm.pair_images[k:], server.algorithm.pair_images[:k], atol=1e-5)


def test_one_pair_per_class_leaves_the_random_stream_of_the_paper_setting(server_with_pairs):
    default = server_with_pairs()
    explicit = server_with_pairs("--kt_pairs_per_class", "1", "--kt_pair_spread", "0.9")
    assert torch.equal(default.algorithm.pair_latents, explicit.algorithm.pair_latents)
    assert torch.equal(default.algorithm.align_rng.get_state(), explicit.algorithm.align_rng.get_state())


def test_feature_norm_makes_the_transfer_loss_blind_to_the_feature_scale(server_with_pairs):
    server = server_with_pairs("-kfn", "1")
    client = server.clients[0]
    client.model.eval()
    images, latents = client.pair_images, client.pair_latents
    before = client.transfer_loss(images, latents).item()
    features = client.generated_features(images).detach()
    assert before == pytest.approx(F.mse_loss(client.proj(F.normalize(features, dim=1)), latents).item(), rel=1e-5)
    client.generated_features = lambda x: 3.0 * features
    assert client.transfer_loss(images, latents).item() == pytest.approx(before, rel=1e-5)
    client.feature_norm = False
    assert client.transfer_loss(images, latents).item() == pytest.approx(
        F.mse_loss(client.proj(3.0 * features), latents).item(), rel=1e-5)


def test_without_base_gradient_only_proj_learns_the_task(server_with_pairs):
    server = server_with_pairs("-kbg", "0")
    client = server.clients[0]
    client.model.train()
    client.model.zero_grad()
    client.proj.zero_grad()
    client.transfer_loss(client.pair_images, client.pair_latents).backward()
    assert all(p.grad is None for p in client.model.base.parameters())
    assert client.proj.weight.grad is not None and client.proj.weight.grad.abs().sum() > 0


def test_mu_warmup_raises_mu_linearly_and_reaches_the_full_value(server_with_pairs, fixed_batch):
    server = server_with_pairs("--mu_warmup", "4", "-mu", "20")
    assert [server.algorithm.mu_at(r) for r in range(6)] == [0.0, 5.0, 10.0, 15.0, 20.0, 20.0]
    assert all(client.mu == 5.0 for client in server.clients), "send() hands each client the round's mu"
    client = server.clients[0]
    x, y = fixed_batch(client)
    client.model.eval()
    classification = client.classification_loss(x, y)
    rng_state = client.rng.get_state()
    transfer = client.transfer_loss(*client.next_pairs())
    client.rng.set_state(rng_state)
    client.pair_order = torch.empty(0, dtype=torch.long)
    assert client.training_loss(x, y).item() == pytest.approx((classification + 5.0 * transfer).item(), rel=1e-5)


def test_diagnostics_measure_the_two_gradients_and_leave_training_unchanged(server_with_pairs, fixed_batch):
    server = server_with_pairs()
    plain = server.clients[0]
    measured = copy.deepcopy(plain)
    measured.diagnostics = True
    plain.train()
    measured.train()
    for p, q in zip(plain.model.state_dict().values(), measured.model.state_dict().values()):
        assert torch.equal(p, q)
    assert plain.gradient_records == [] and len(measured.gradient_records) == measured.batches_last_round

    probe = copy.deepcopy(server.clients[1])
    probe.diagnostics = True
    x, y = fixed_batch(probe)
    probe.model.train()
    order = probe.pair_order.clone()
    probe.training_loss(x, y)
    norms_and_cosine = probe.gradient_records[-1]
    probe.pair_order = order
    images, latents = probe.next_pairs()
    shared = [p for p in probe.model.base.parameters()]
    g_class = torch.autograd.grad(probe.classification_loss(x, y), shared, allow_unused=True)
    g_transfer = torch.autograd.grad(probe.mu * probe.transfer_loss(images, latents), shared, allow_unused=True)
    flat = [torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(shared, gs)])
            for gs in (g_class, g_transfer)]
    assert norms_and_cosine[0].item() == pytest.approx(flat[0].norm().item(), rel=1e-4)
    assert norms_and_cosine[1].item() == pytest.approx(flat[1].norm().item(), rel=1e-4)
    assert norms_and_cosine[2].item() == pytest.approx(F.cosine_similarity(*flat, dim=0).item(), abs=1e-4)


def test_round_metrics_include_the_shift_and_gradient_measures(server_with_pairs, round_timer):
    server = server_with_pairs("--kt_diagnostics", "1")
    first = server.algorithm.pair_latents.clone()
    for client in server.clients:
        client.train()
    server.exchange(server.clients, round_timer(server))
    m = server.algorithm.round_metrics
    assert m["centroid_shift"] == pytest.approx(centroid_shift(first, server.algorithm.pair_latents), rel=1e-6)
    assert m["centroid_shift"] > 0
    assert -1 <= m["grad_cosine"] <= 1 and m["transfer_grad_norm"] > 0 and m["classification_grad_norm"] > 0


def test_centroid_shift_is_relative_and_nan_without_a_previous_round():
    previous = torch.tensor([[3.0, 4.0], [0.0, 5.0]])
    assert centroid_shift(previous, previous * 1.5) == pytest.approx(0.5)
    assert math.isnan(centroid_shift(None, previous))


@pytest.mark.parametrize("flag,value,fragment", [("--kt_pairs_per_class", "0", "--kt_pairs_per_class"),
                                                 ("--kt_pair_spread", "1.5", "--kt_pair_spread"),
                                                 ("--mu_warmup", "-1", "--mu_warmup"),
                                                 ("-mu", "-2", "-mu must be >= 0")])
def test_bad_transfer_flags_are_refused(small_run, flag, value, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_args(small_run("-algo", "FedKTL-stylegan-3", flag, value))
