"""FedMRL: the Matryoshka loss and inference, what travels (the shared model only, counted by hand), the server's
sample-weighted average, 1-channel inputs, and its flags' errors."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flcore.clients.clientbase import ClientSetup
from flcore.errors import UserError
from flcore.servers.servermrl import ServerFedMRL
from flcore.trainmodel import build_model
from flutils import experiment
from flutils.data import load_federated_dataset
from flutils.options import parse_args

K, FEATURE_DIM, D1 = 10, 64, 16
SMALL = ["--shots", "20", "-sfd", str(D1)]


def shared_model_floats():
    return sum(p.numel() for p in build_model("cnn4", K, D1, 3, 32).parameters())


def test_the_nested_slice_feeds_the_shared_header_and_the_loss_weighs_both_headers(make_server, fixed_batch):
    server = make_server("FedMRL", *SMALL, "--mrl_global_weight", "0.3", "--mrl_local_weight", "2")
    client = server.clients[1]
    x, y = fixed_batch(client)
    for module in (client.model, client.global_model, client.projector):
        module.eval()
    fused = client.fuse(x)
    assert fused.shape == (len(y), FEATURE_DIM)
    assert client.projector.weight.shape == (FEATURE_DIM, D1 + FEATURE_DIM), "fuses [shared (d1), private (-fd)]"
    global_logits, local_logits = client.heads(fused)

    changed = fused.clone()
    changed[:, D1:] += torch.randn_like(changed[:, D1:])
    global_changed, local_changed = client.heads(changed)
    torch.testing.assert_close(global_changed, global_logits, rtol=0, atol=0)
    assert not torch.allclose(local_changed, local_logits), "the private header reads every dimension"

    expected = 0.3 * F.cross_entropy(global_logits, y) + 2 * F.cross_entropy(local_logits, y)
    assert client.training_loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    # Inference is the whole model without the shared header.
    torch.testing.assert_close(client.scores(x), local_logits)


def test_training_moves_the_shared_model_the_private_model_and_the_projector(make_server):
    client = make_server("FedMRL", *SMALL).clients[0]
    before = [[p.detach().clone() for p in m.parameters()] for m in (client.model, client.global_model,
                                                                     client.projector)]
    client.train()
    for old, module in zip(before, (client.model, client.global_model, client.projector)):
        assert any(not torch.equal(a, b) for a, b in zip(old, module.parameters())), type(module).__name__


def test_only_the_shared_model_is_uploaded_and_the_server_averages_it_by_samples(make_server, round_timer):
    server = make_server("FedMRL", *SMALL)
    algorithm = server.algorithm
    first = server.clients[0].global_model.state_dict()
    assert all(torch.equal(first[k], c.global_model.state_dict()[k]) for c in server.clients for k in first)
    for c in server.clients[:3]:
        c.train()
    arrived = server.clients[:3]
    for c in arrived:
        upload = c.upload()
        assert set(upload.tensors) == {f"global/{name}" for name, _ in c.global_model.named_parameters()}
        private = [p for m in (c.model, c.projector) for p in m.parameters()]
        assert not any(t.shape == p.shape and torch.equal(t, p) for t in upload.tensors.values() for p in private)
    weights = torch.tensor([c.num_train for c in arrived], dtype=torch.float64)
    assert len(set(weights.tolist())) > 1, "unequal sample counts tell a weighted mean from a plain one"
    expected = {name: sum(w / weights.sum() * dict(c.global_model.named_parameters())[name].detach().double()
                          for w, c in zip(weights, arrived)) for name in algorithm.global_parameters}
    server.exchange(arrived, round_timer(server))
    assert server.upload_floats == 3 * shared_model_floats()
    for name, value in expected.items():
        torch.testing.assert_close(algorithm.global_parameters[name].double(), value, rtol=1e-6, atol=1e-7)

    untouched = {k: v.clone() for k, v in server.clients[3].model.state_dict().items()}
    server.send(server.clients[3:])
    assert server.download_floats == shared_model_floats()
    for name, p in server.clients[3].global_model.named_parameters():
        torch.testing.assert_close(p.detach(), algorithm.global_parameters[name])
    assert all(torch.equal(v, server.clients[3].model.state_dict()[k]) for k, v in untouched.items())


def test_the_uniform_average_is_one_flag_away(make_server, round_timer):
    server = make_server("FedMRL", *SMALL, "--mrl_average", "uniform")
    arrived = server.clients[:3]
    for c in arrived:
        c.train()
    name = next(iter(server.algorithm.global_parameters))
    expected = torch.stack([dict(c.global_model.named_parameters())[name].detach() for c in arrived]).mean(0)
    server.exchange(arrived, round_timer(server))
    torch.testing.assert_close(server.algorithm.global_parameters[name], expected)


def test_two_rounds_end_to_end_with_hand_counted_communication(small_run, results_of):
    argv = small_run("-algo", "FedMRL", "-gr", "2", *SMALL)
    assert experiment.main(argv) == 0
    data = results_of(argv)
    clients = len(load_federated_dataset(parse_args(argv).run).clients)
    assert data["rs_test_auc"][-1] > data["rs_test_auc"][0] + 0.05, "the models should learn"
    np.testing.assert_array_equal(data["upload_floats"], [clients * shared_model_floats()] * 2)
    np.testing.assert_array_equal(data["download_floats"], [clients * shared_model_floats()] * 2)


def test_grayscale_images_of_28_pixels_train_and_predict():
    """MNIST-shaped inputs: the shared model is built for the clients' channels and size."""
    torch.manual_seed(0)
    data = SimpleNamespace(train_x=torch.randn(12, 1, 28, 28), train_y=torch.arange(12) % K,
                           test_x=torch.randn(6, 1, 28, 28), test_y=torch.arange(6) % K)
    shared = build_model("cnn4", K, D1, 1, 28)
    spec = SimpleNamespace(tensors={f"global/{k}": v for k, v in shared.state_dict().items()},
                           config={"mrl_model": "cnn4", "sub_feature_dim": D1, "channels": 1, "height": 28,
                                   "global_weight": 1.0, "local_weight": 1.0})
    setup = ClientSetup(client_id=0, model=build_model("tiny_mixer", K, FEATURE_DIM, 1, 28), data=data, seed=0,
                        device=torch.device("cpu"), num_classes=K, batch_size=4, local_epochs=1, learning_rate=0.01)
    client = ServerFedMRL.new_client(setup, spec)
    client.train()
    assert np.isfinite(client.last_train_loss) and client.batches_last_round == 3
    correct, samples, auc, loss = client.test_metrics()
    assert samples == 6 and 0 <= correct <= 6 and np.isfinite(loss)


@pytest.mark.parametrize("flags,fragment", [
    (["-sfd", "0"], "-sfd must be >= 1"),
    (["-sfd", str(FEATURE_DIM + 1)], f"-sfd {FEATURE_DIM + 1} must be <= -fd {FEATURE_DIM}"),
    (["--mrl_model", "nope"], "--mrl_model: unknown model 'nope'"),
    (["--mrl_global_weight", "-1"], "--mrl_global_weight must be >= 0"),
    (["--mrl_local_weight", "-0.5"], "--mrl_local_weight must be >= 0"),
    (["--mrl_global_weight", "0", "--mrl_local_weight", "0"], "got both 0"),
])
def test_bad_flags_give_one_line_errors(small_run, error_line, flags, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_args(small_run("-algo", "FedMRL", *SMALL, *flags))
    assert fragment in error_line(experiment.main, small_run("-algo", "FedMRL", *SMALL, *flags))


def test_bad_average_choice_names_the_flag(small_run, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(small_run("-algo", "FedMRL", "--mrl_average", "median"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1
    assert "--mrl_average: invalid choice: 'median' (choose from 'samples', 'uniform')" in lines[0]
