"""--kt_norm: what the client's forward of generated images does to BatchNorm (flcore/batchnorm.py)."""
import copy
import math

import pytest
import torch
from torch import nn

from flcore.batchnorm import AuxiliaryBatchNorm, batchnorm_layers, running_stats_untouched

BN_CLIENT, LAYERNORM_CLIENT = 0, 3  # HtCPU4: tiny_cnn (BatchNorm), tiny_mixer (LayerNorm only)
# make_server's algorithm and flags: the built-in generator and a short domain alignment.
FAST_KTL = ["FedKTL-stylegan-3", "-gen", "untrained", "-se", "2", "-sbs", "8"]


def buffers(module):
    return {name: value.clone() for name, value in module.named_buffers()}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def modes(small_argv, server_from_argv, round_timer, tmp_path_factory):
    """Per --kt_norm mode, the clients of a server after one round, holding the generated pairs."""
    clients = {}
    for mode in ("update", "keep", "aux"):
        server = server_from_argv(small_argv(tmp_path_factory.mktemp("results"), "-algo", *FAST_KTL, "--kt_norm", mode))
        server.exchange(server.clients, round_timer(server))
        server.send(server.clients)
        clients[mode] = server.clients
    return clients


def test_update_moves_running_statistics_and_keep_leaves_them_bit_identical(modes):
    for mode, should_move in (("update", True), ("keep", False), ("aux", False)):
        client = modes[mode][BN_CLIENT]
        client.model.train()
        before = buffers(client.model.base)
        client.generated_features(client.pair_images)
        assert same_tensors(before, buffers(client.model.base)) != should_move, mode


def test_keep_normalizes_with_batch_statistics_so_features_and_gradients_equal_update(modes):
    client = modes["keep"][BN_CLIENT]
    twin = copy.deepcopy(client)
    twin.kt_norm = "update"
    for c in (client, twin):
        c.model.train()
        c.model.zero_grad()
    kept, updated = client.generated_features(client.pair_images), twin.generated_features(twin.pair_images)
    assert torch.equal(kept, updated)
    kept.square().sum().backward()
    updated.square().sum().backward()
    for (name, p), (_, q) in zip(client.model.base.named_parameters(), twin.model.base.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_aux_trains_its_own_batchnorm_and_shares_the_rest(modes):
    client = modes["aux"][BN_CLIENT]
    client.model.train()
    client.model.zero_grad()
    client.aux_norm.zero_grad()
    aux_before = buffers(client.aux_norm)
    client.generated_features(client.pair_images).square().sum().backward()
    assert not same_tensors(aux_before, buffers(client.aux_norm)), "the auxiliary running statistics learn"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in client.aux_norm.affine)
    for _, layer in batchnorm_layers(client.model.base):
        assert layer.weight.grad is None and layer.bias.grad is None, "the model's own BatchNorm is not used"
    convs = [m for m in client.model.base.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.grad is not None for m in convs), "the other layers are shared"
    expected = 2 * sum(layer.num_features for _, layer in batchnorm_layers(client.model.base))
    assert sum(p.numel() for p in client.aux_norm.affine) == expected


def test_aux_state_survives_a_checkpoint(modes):
    client = modes["aux"][BN_CLIENT]
    client.model.train()
    client.generated_features(client.pair_images)
    state = copy.deepcopy(client.state_dict())
    saved = buffers(client.aux_norm)
    client.generated_features(torch.flip(client.pair_images, dims=[0]) * 0.5)
    assert not same_tensors(saved, buffers(client.aux_norm))
    client.load_state_dict(state)
    assert same_tensors(saved, buffers(client.aux_norm))


def test_every_mode_is_the_plain_forward_without_batchnorm(modes):
    features = []
    for mode in ("update", "keep", "aux"):
        client = modes[mode][LAYERNORM_CLIENT]
        assert not batchnorm_layers(client.model.base)
        client.model.train()
        before = buffers(client.model.base)
        features.append(client.generated_features(client.pair_images))
        assert same_tensors(before, buffers(client.model.base))
    assert len(modes["aux"][LAYERNORM_CLIENT].aux_norm.affine) == 0
    # Same seed and data in every mode, so the untouched models are identical.
    assert torch.equal(features[0], features[1]) and torch.equal(features[0], features[2])


def test_running_stats_untouched_restores_tracking_after_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    with pytest.raises(RuntimeError):
        with running_stats_untouched(model):
            model(torch.randn(5, 7))
    assert model[1].track_running_stats
    model(torch.randn(5, 3))
    assert model[1].num_batches_tracked == 1


def test_auxiliary_batchnorm_copies_start_equal_and_are_not_saved_twice():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model[1].weight.data.uniform_(0.5, 1.5)
    aux = AuxiliaryBatchNorm(model)
    assert not any(key.startswith("module") for key in aux.state_dict())
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(aux(x), model(x)), "in eval mode both use identical copies"


def test_margin_warmup_rises_linearly_then_stays(make_server):
    server = make_server(*FAST_KTL, "--margin_warmup", "4", "-margin", "0.4")
    margins = []
    for r in range(6):
        server.round = server.algorithm.round = r
        server.send(server.clients)
        margins.append(server.clients[1].margin)
    assert margins == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    no_warmup = make_server(*FAST_KTL, "-margin", "0.4")
    assert no_warmup.algorithm.margin_at(0) == 0.4, "no warm-up: the full margin from round 0 (the paper)"


@pytest.mark.parametrize("clip,clipped", [("0", 0.0), ("1e-4", 1.0)])
def test_client_gradient_clip_is_measured_and_applied(make_server, round_timer, clip, clipped):
    server = make_server(*FAST_KTL, "--client_grad_clip", clip)
    client = server.clients[0]
    before = [p.detach().clone() for p in client.model.parameters()]
    client.train()
    assert len(client.grad_norms) == client.batches_last_round and min(client.grad_norms) > 0
    server.exchange([client], round_timer(server))
    metrics = server.algorithm.round_metrics
    assert metrics["client_grad_norm"] == pytest.approx(float(torch.stack(client.grad_norms).mean()))
    assert metrics["clipped_fraction"] == clipped
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(client.model.parameters(), before)))
    if clipped:  # every SGD step is at most lr * clip long
        assert moved <= client.batches_last_round * 0.01 * 1e-4 * (1 + 1e-4)
    else:
        assert moved > 1e-3


def test_transfer_loss_is_recorded_per_step_from_the_first_pairs_on(make_server, round_timer):
    server = make_server(*FAST_KTL)
    client = server.clients[0]
    client.train()
    timer = round_timer(server)
    server.exchange([client], timer)
    assert client.transfer_losses == [] and math.isnan(server.algorithm.round_metrics["transfer_loss"])
    server.send([client])
    client.train()
    assert len(client.transfer_losses) == client.batches_last_round
    server.exchange([client], timer)
    assert server.algorithm.round_metrics["transfer_loss"] == pytest.approx(
        float(torch.stack(client.transfer_losses).mean()))
    assert server.algorithm.round_metrics["transfer_loss"] > 0
