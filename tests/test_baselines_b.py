"""FedProto, FedKD, FedGH and FedTGP: end to end on Digits, communication counted by hand, the prototype
classifier and regularizer, SVD compression."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flcore.clients.clientbase import ClientSetup
from flcore.clients.clientkd import shared_state
from flcore.clients.clientproto import ClientFedProto
from flcore.clients.clienttgp import ClientFedTGP
from flcore.exchange import Payload, unflatten
from flcore.servers.servertgp import adaptive_margin
from flcore.svd import kept_rank, packed_floats, svd_compress, svd_decompress
from flcore.trainmodel import BaseHeadSplit
from flutils import experiment
from flutils.data import ClientData, load_federated_dataset
from flcore.errors import UserError
from flutils.options import parse_args

D = 64  # small_run's feature dimension
K = 10
CLIENTS = 4
CPU = torch.device("cpu")


@pytest.fixture
def run_two_rounds(small_run, results_of):
    """run_two_rounds(algorithm, *flags): main.py's flags and .h5 of a 2-round run that beat chance."""
    def run(algorithm, *flags):
        argv = small_run("-algo", algorithm, "-gr", "2", *flags)
        assert experiment.main(argv) == 0
        data = results_of(argv)
        assert data["rs_test_acc"].max() > 0.1, f"{algorithm} should beat chance (0.1) on Digits"
        assert len(data["upload_floats"]) == 2
        return argv, data
    return run


def local_classes(argv):
    return [set(torch.unique(c.train_y).tolist()) for c in load_federated_dataset(parse_args(argv).run).clients]


def test_fedproto_end_to_end_communication(run_two_rounds):
    argv, data = run_two_rounds("FedProto")
    classes = local_classes(argv)
    # Per local class: the mean feature (D floats) and its sample count (the weight of the average).
    assert np.all(data["upload_floats"] == sum(map(len, classes)) * (D + 1))
    # Right after aggregation, every client gets the prototype of every class some client holds.
    assert np.all(data["download_floats"] == CLIENTS * len(set().union(*classes)) * D)


def test_fedgh_end_to_end_communication(run_two_rounds):
    argv, data = run_two_rounds("FedGH")
    assert np.all(data["upload_floats"] == sum(map(len, local_classes(argv))) * D)
    assert np.all(data["download_floats"] == CLIENTS * (D * K + K)), "the global head, Linear(D, K)"
    assert np.all(np.isfinite(data["server_loss"]))


def test_fedtgp_end_to_end_communication(run_two_rounds):
    argv, data = run_two_rounds("FedTGP", "-mart", "1.5")
    assert np.all(data["upload_floats"] == sum(map(len, local_classes(argv))) * D)
    assert np.all(data["download_floats"] == CLIENTS * K * D), "all K trained prototypes"
    assert np.all((data["margin"] > 0) & (data["margin"] <= 1.5))


def test_fedkd_end_to_end_communication(run_two_rounds):
    argv, data = run_two_rounds("FedKD")
    mentee_floats = 156810  # cnn4 at 3x32x32, D 64, K 10: (2400+32) + (51200+64) + (102400+64) + (640+10)
    assert data["download_floats"][0] > CLIENTS * mentee_floats, "the whole mentee first, then the update"
    assert data["download_floats"][1] < CLIENTS * mentee_floats / 4
    assert np.all(data["upload_floats"] < CLIENTS * mentee_floats / 4), "updates travel compressed"
    assert data["svd_energy"] == pytest.approx([0.95, 0.965]), "T_start + (T_end - T_start) * round / rounds"


def test_fedkd_counts_the_svd_factors_it_sends(make_server, round_timer):
    server = make_server("FedKD")
    algorithm = server.algorithm
    state = shared_state(algorithm.mentee)
    assert sum(t.numel() for t in state.values()) == 156810
    server.send(server.clients)
    assert server.download_floats == CLIENTS * 156810, "a client's first download is the whole mentee"

    # Client i moves every matrix by one unit at entry (i, i): rank 1, in directions orthogonal across clients.
    for i, client in enumerate(server.clients):
        with torch.no_grad():
            for t in shared_state(client.mentee).values():
                if t.dim() >= 2:
                    t.view(t.shape[0], -1)[i, i] += 1.0
                else:
                    t += 0.5
    matrices = [(t.shape[0], t[0].numel()) for t in state.values() if t.dim() >= 2]
    rank_one = sum(m + n + 1 for m, n in matrices)
    vectors = sum(t.numel() for t in state.values() if t.dim() < 2)
    assert server.clients[0].energy == 0.95, "the first round's energy came with the mentee"
    upload = server.clients[0].upload()
    packed_upload = unflatten(upload.tensors, "delta")
    assert all(packed["s"].numel() == 1 for packed in packed_upload.values() if "s" in packed)
    assert packed_floats(packed_upload) == upload.floats() == rank_one + vectors

    server.download_floats = 0
    server.exchange(server.clients, round_timer(server))
    assert server.upload_floats == CLIENTS * (rank_one + vectors)
    # The average holds 4 orthogonal directions of equal weight (3/4 < 0.95 of the energy): rank 4 is kept.
    assert all(packed["s"].numel() == 4 for packed in algorithm.last_update.values() if "s" in packed)
    assert server.download_floats == CLIENTS * (4 * rank_one + vectors)
    for client in server.clients:
        assert algorithm.synced_versions[client.id] == algorithm.version == 1
        for name, t in shared_state(client.mentee).items():
            torch.testing.assert_close(t, state[name])

    # A client one version behind gets the last compressed update; one further behind, the whole mentee.
    straggler, others = server.clients[0], server.clients[1:]
    server.exchange(others, round_timer(server))
    server.download_floats = 0
    server.send([straggler])
    assert server.download_floats == packed_floats(algorithm.last_update) and algorithm.synced_versions[0] == 2
    server.exchange(others, round_timer(server))
    server.exchange(others, round_timer(server))
    server.download_floats = 0
    server.send([straggler])
    assert server.download_floats == 156810 and algorithm.synced_versions[0] == 4


def orthonormal(rows, cols, rng):
    return torch.linalg.qr(torch.randn(rows, cols, generator=rng, dtype=torch.float64))[0]


@pytest.mark.parametrize("energy,rank", [(0.5, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 6)])
def test_svd_compression_keeps_the_requested_energy(energy, rank):
    rng = torch.Generator().manual_seed(0)
    singular = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    # Energy shares of the leading 1..6 values: 0.750, 0.938, 0.985, 0.997, 0.9993, 1.
    matrix = orthonormal(40, 6, rng) @ torch.diag(singular) @ orthonormal(30, 6, rng).T
    tensor = matrix.reshape(40, 3, 5, 2)
    assert kept_rank(singular, energy) == rank
    packed = svd_compress(tensor, energy)
    assert packed["u"].shape == (40, rank) and packed["s"].shape == (rank,) and packed["v"].shape == (rank, 30)
    assert packed_floats({"w": packed}) == rank * (40 + 30 + 1)
    restored = svd_decompress(packed, tensor.shape)
    assert restored.shape == tensor.shape
    kept = float(singular[:rank].pow(2).sum() / singular.pow(2).sum())
    assert kept >= energy - 1e-12
    lost = float((restored - tensor).pow(2).sum() / tensor.pow(2).sum())
    assert lost == pytest.approx(1 - kept, abs=1e-9)


def test_svd_compression_of_vectors_and_zero_matrices():
    bias = torch.arange(5.0)
    assert torch.equal(svd_decompress(svd_compress(bias, 0.9), bias.shape), bias)
    assert packed_floats({"b": svd_compress(bias, 0.9)}) == 5
    zero = svd_compress(torch.zeros(6, 4), 0.95)
    assert packed_floats({"w": zero}) == 0 and torch.equal(svd_decompress(zero, (6, 4)), torch.zeros(6, 4))


POINTS = torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 8.0], [6.0, 4.0]])
LABELS = torch.tensor([0, 1, 2, 1])
PROTOTYPES = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
ALL = torch.ones(3, dtype=torch.bool)
NO_CLASS_1 = torch.tensor([True, False, True])


def knowledge(prototypes, present):
    """The server's payload of global prototypes: the rows of the classes that have one."""
    classes = torch.nonzero(present).squeeze(1)
    return Payload({"prototypes": prototypes[classes], "classes": classes})


def identity_client(cls=ClientFedProto, lamda=1.0, proto_eval="nearest"):
    """A 3-class client whose features are its 2-D inputs and whose head always says class 2."""
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    model = BaseHeadSplit(nn.Identity(), head, 2, 3, "identity")
    setup = ClientSetup(client_id=0, model=model, data=ClientData(POINTS, LABELS, POINTS, LABELS), seed=0, device=CPU,
                        num_classes=3, batch_size=10, local_epochs=1, learning_rate=0.01)
    return cls(setup, lamda=lamda, proto_eval=proto_eval)


def test_fedproto_predicts_the_nearest_global_prototype(small_run):
    client = identity_client()
    assert client.test_metrics()[:2] == (1, 4), "the head until global prototypes arrive"
    client.receive(knowledge(PROTOTYPES, ALL))
    scores = client.scores(POINTS)
    torch.testing.assert_close(scores[0], -torch.tensor([2.0, 82.0, 82.0]).sqrt())
    assert scores.argmax(1).tolist() == [0, 1, 2, 1]
    correct, total, auc, _ = client.test_metrics()
    assert (correct, total) == (4, 4) and auc == pytest.approx(1.0)
    client.receive(knowledge(PROTOTYPES, NO_CLASS_1))
    assert client.scores(POINTS).argmax(1).tolist() == [0, 0, 2, 0], "a class without a prototype is never chosen"
    assert np.isfinite(client.test_metrics()[2])


@pytest.mark.parametrize("cls", [ClientFedProto, ClientFedTGP])
def test_prototype_term_is_lamda_times_mse_and_vanishes_at_zero(small_run, cls):
    unweighted, weighted = identity_client(cls, 0.0), identity_client(cls, 2.0)
    ce = F.cross_entropy(weighted.model(POINTS), LABELS).item()
    assert weighted.training_loss(POINTS, LABELS).item() == pytest.approx(ce), "no term before prototypes"
    for client in (unweighted, weighted):
        client.receive(knowledge(PROTOTYPES, ALL))
    assert unweighted.training_loss(POINTS, LABELS).item() == pytest.approx(ce)
    # Squared distances to the label's prototype: 2, 2, 5, 32 over 4 samples x 2 dimensions.
    assert weighted.training_loss(POINTS, LABELS).item() == pytest.approx(ce + 2 * 41 / 8)
    weighted.receive(knowledge(PROTOTYPES, NO_CLASS_1))
    assert weighted.training_loss(POINTS, LABELS).item() == pytest.approx(ce + 2 * 7 / 8)


def test_fedproto_averages_prototypes_weighted_by_sample_counts(make_server):
    server = make_server("FedProto")
    algorithm = server.algorithm
    means = torch.stack([torch.full((D,), v) for v in (1.0, 5.0, 2.0)])
    algorithm.update_knowledge(means, torch.tensor([2, 2, 7]), torch.tensor([1.0, 3.0, 10.0]))
    assert torch.equal(algorithm.present.nonzero().squeeze(1), torch.tensor([2, 7]))
    torch.testing.assert_close(algorithm.global_prototypes[2], torch.full((D,), 4.0))  # (1*1 + 3*5) / 4
    algorithm.update_knowledge(torch.full((1, D), 6.0), torch.tensor([7]), torch.tensor([2.0]))
    torch.testing.assert_close(algorithm.global_prototypes[2], torch.full((D,), 4.0))  # kept: nobody sent class 2
    torch.testing.assert_close(algorithm.global_prototypes[7], torch.full((D,), 6.0))
    assert algorithm.knowledge().floats() == 2 * D, "the rows of the classes that have a prototype"


def test_fedtgp_adaptive_margin():
    prototypes = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [1.0, 5.0]])
    classes = torch.tensor([0, 0, 1, 2])
    # Class centers (1,0), (4,0), (1,5): nearest-other distances 3, 3, 5; the margin is the largest.
    assert adaptive_margin(prototypes, classes, 3, 100.0) == pytest.approx(5.0)
    assert adaptive_margin(prototypes, classes, 3, 2.0) == 2.0
    assert adaptive_margin(prototypes[:2], classes[:2], 3, 100.0) == 0.0


def test_fedtgp_server_training_separates_the_classes(make_server):
    server = make_server("FedTGP", "-se", "100", "-slr", "0.05")
    algorithm = server.algorithm
    rng = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, D, generator=rng)
    classes = torch.tensor([1, 4, 8]).repeat_interleave(4)
    rows = centers.repeat_interleave(4, 0) + 0.3 * torch.randn(12, D, generator=rng)
    algorithm.update_knowledge(rows, classes, None)
    assert algorithm.global_prototypes.shape == (K, D)
    nearest = torch.cdist(rows, algorithm.global_prototypes).argmin(1)
    assert torch.equal(nearest, classes)


def test_fedgh_clients_take_the_global_head(make_server, round_timer):
    server = make_server("FedGH", "-se", "5")
    algorithm = server.algorithm
    uploaded = sum(len(client.upload().tensors["classes"]) for client in server.clients)
    server.exchange(server.clients, round_timer(server))
    assert server.upload_floats == uploaded * D
    assert server.download_floats == CLIENTS * (D * K + K)
    for client in server.clients:
        assert torch.equal(client.model.head.weight, algorithm.head.weight)
        assert torch.equal(client.model.head.bias, algorithm.head.bias)
    server.download_floats = 0
    server.send(server.clients)
    assert server.download_floats == 0, "clients already hold the latest head"


@pytest.mark.parametrize("family", ["HtM10", "cnn4+mlp128"])
def test_fedgh_refuses_a_non_linear_head(small_run, family):
    with pytest.raises(UserError, match=f"-algo FedGH needs linear heads, but -m {re.escape(family)} has heads"):
        parse_args(small_run("-algo", "FedGH", "-m", family))


@pytest.mark.parametrize("flags,fragment", [(("-Ts", "0.99", "-Te", "0.9"), "-Ts"),
                                            (("--mentee_model", "nope"), "unknown model"),
                                            (("-mlr", "0"), "-mlr")])
def test_fedkd_bad_flags(small_run, error_line, flags, fragment):
    assert fragment in error_line(experiment.main, small_run("-algo", "FedKD", *flags))
