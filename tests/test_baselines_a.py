"""FedDistill, FML, LG-FedAvg and FedGen: end-to-end runs, communication counts by hand, their losses."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flcore.trainmodel import build_model
from flutils import experiment
from flutils.data import load_federated_dataset
from flcore.errors import UserError
from flutils.options import parse_args

K, FEATURE_DIM, NOISE_DIM, HIDDEN_DIM = 10, 64, 32, 32
# Few shots and a small generator: a few seconds a run.
FEW_SHOTS = ["--shots", "20"]
SMALL_GENERATOR = ["-se", "10", "-nd", str(NOISE_DIM), "-hd", str(HIDDEN_DIM)]


def fast_flags(algorithm):
    return FEW_SHOTS + (SMALL_GENERATOR if algorithm == "FedGen" else [])


def head_floats():
    return K * FEATURE_DIM + K


def generator_floats():
    """Linear(noise + K -> hidden), BatchNorm (weight, bias, running mean and variance), Linear(hidden -> feature)."""
    return (NOISE_DIM + K) * HIDDEN_DIM + HIDDEN_DIM + 4 * HIDDEN_DIM + HIDDEN_DIM * FEATURE_DIM + FEATURE_DIM


def fml_model_floats():
    return sum(p.numel() for p in build_model("cnn4", K, FEATURE_DIM, 3, 32).parameters())


def expected_floats(algorithm, dataset):
    """(upload per round, download per round) of a 2-round run where all 4 clients join and arrive."""
    clients = len(dataset.clients)
    if algorithm in ("FedDistill", "FD"):
        local_classes = [len(torch.unique(c.train_y)) for c in dataset.clients]
        all_classes = len(torch.unique(torch.cat([c.train_y for c in dataset.clients])))
        return [sum(local_classes) * K] * 2, [0, clients * all_classes * K]
    if algorithm == "FML":
        return [clients * fml_model_floats()] * 2, [clients * fml_model_floats()] * 2
    if algorithm in ("LG-FedAvg", "LG"):
        return [clients * head_floats()] * 2, [0, clients * head_floats()]
    assert algorithm == "FedGen"
    return [clients * (head_floats() + K)] * 2, [0, clients * (head_floats() + generator_floats() + K)]


@pytest.mark.parametrize("algorithm", ["FedDistill", "FD", "FML", "LG-FedAvg", "LG", "FedGen"])
def test_two_rounds_end_to_end_with_hand_counted_communication(small_run, results_of, algorithm):
    argv = small_run("-algo", algorithm, "-gr", "2", *fast_flags(algorithm))
    assert experiment.main(argv) == 0
    data = results_of(argv)
    # After sending the averaged heads, heterogeneous clients start slowly (LG, FedGen): above chance and learning.
    assert data["rs_test_acc"].max() > 0.1, "should beat chance (0.1) on label-skewed Digits"
    assert data["rs_test_auc"][-1] > data["rs_test_auc"][0] + 0.05, "the models should learn"
    upload, download = expected_floats(algorithm, load_federated_dataset(parse_args(argv).run))
    np.testing.assert_array_equal(data["upload_floats"], upload)
    np.testing.assert_array_equal(data["download_floats"], download)
    if algorithm == "FedGen":
        assert len(data["generator_loss"]) == 2 and np.all(np.isfinite(data["generator_loss"]))


def test_lg_averages_heads_by_samples_and_sends_them_to_the_selected_clients(make_server, round_timer):
    server = make_server("LG", *FEW_SHOTS)
    arrived = server.clients[:3]
    weights = torch.tensor([c.num_train for c in arrived], dtype=torch.float32)
    expected = sum(w * c.model.head.weight.detach() for w, c in zip(weights / weights.sum(), arrived))
    server.exchange(arrived, round_timer(server))
    assert server.upload_floats == 3 * head_floats()
    torch.testing.assert_close(server.algorithm.global_head["weight"], expected)

    untouched = server.clients[3].model.head.weight.detach().clone()
    server.send(server.clients[:2])
    assert server.download_floats == 2 * head_floats()
    for client in server.clients[:2]:
        torch.testing.assert_close(client.model.head.weight, expected)
    assert torch.equal(server.clients[3].model.head.weight, untouched)


@pytest.mark.parametrize("algorithm", ["LG-FedAvg", "FedGen"])
def test_head_sharing_refuses_a_family_with_heads_of_another_architecture(small_run, algorithm):
    # HtM10's ViTs have two-layer heads; parsing refuses the run before anything is built or written.
    with pytest.raises(UserError, match=f"-algo {algorithm} needs one head architecture for all clients, but -m "
                                        "HtM10 has heads linear, vit; use a family with linear heads"):
        parse_args(small_run("-algo", algorithm, "-m", "HtM10"))


@pytest.mark.parametrize("lam", ["0", "1"])
def test_feddistill_loss_and_per_class_average(make_server, round_timer, fixed_batch, lam):
    server = make_server("FedDistill", *FEW_SHOTS, "-lam", lam)
    algorithm = server.algorithm
    client = server.clients[1]
    x, y = fixed_batch(client)
    client.model.eval()
    cross_entropy = F.cross_entropy(client.model(x), y).item()
    assert client.training_loss(x, y).item() == pytest.approx(cross_entropy, rel=1e-6), "no global logits yet"

    for c in server.clients:
        c.train()
    uploads = [(u.tensors["logits"], u.tensors["classes"]) for u in (c.upload() for c in server.clients)]
    server.exchange(server.clients, round_timer(server))
    for row, cls in zip(algorithm.global_logits, algorithm.global_classes.tolist()):
        rows = [logits[(classes == cls).nonzero().item()] for logits, classes in uploads if cls in classes]
        torch.testing.assert_close(row, torch.stack(rows).mean(0))

    server.send([client])
    client.model.eval()
    logits = client.model(x)
    teacher = dict(zip(algorithm.global_classes.tolist(), algorithm.global_logits))
    squared = sum(((logits[i] - teacher[int(label)]) ** 2).sum() for i, label in enumerate(y) if int(label) in teacher)
    expected = F.cross_entropy(logits, y).item() + float(lam) * squared.item() / logits.numel()
    assert client.training_loss(x, y).item() == pytest.approx(expected, rel=1e-5)
    if lam == "1":
        assert squared.item() > 0


def test_feddistill_default_lambda_and_bad_lambda(make_server):
    assert make_server("FedDistill", *FEW_SHOTS).algorithm.settings.lamda == 1.0
    assert make_server("FD", *FEW_SHOTS, "-lam", "0.3").algorithm.settings.lamda == 0.3
    with pytest.raises(UserError, match="-lam"):
        make_server("FedDistill", *FEW_SHOTS, "-lam", "-1")


def kl(teacher_logits, student_logits):
    p = F.softmax(teacher_logits, 1)
    return (p * (F.log_softmax(teacher_logits, 1) - F.log_softmax(student_logits, 1))).sum(1).mean()


@pytest.mark.parametrize("alpha,beta", [("1", "1"), ("0.5", "0.5"), ("0.2", "0.9")])
def test_fml_mutual_loss(make_server, fixed_batch, alpha, beta):
    server = make_server("FML", *FEW_SHOTS, "-al", alpha, "-bt", beta)
    client = server.clients[0]
    x, y = fixed_batch(client)
    client.model.eval()
    client.meme.eval()
    local, meme = client.model(x), client.meme(x)
    a, b = float(alpha), float(beta)
    expected = (a * F.cross_entropy(local, y) + (1 - a) * kl(meme, local)
                + b * F.cross_entropy(meme, y) + (1 - b) * kl(local, meme))
    assert client.training_loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl(meme, local).item() > 0, "the models disagree, so the KL terms matter when alpha, beta < 1"


def test_fml_averages_shared_models_and_every_client_starts_from_one(make_server, round_timer):
    server = make_server("FML", *FEW_SHOTS)
    algorithm = server.algorithm
    first = server.clients[0].meme.state_dict()
    assert all(torch.equal(first[k], c.meme.state_dict()[k]) for c in server.clients for k in first)
    for c in server.clients[:2]:
        c.train()
    arrived = server.clients[:2]
    weights = torch.tensor([c.num_train for c in arrived], dtype=torch.float32)
    name = next(iter(algorithm.global_meme))
    expected = sum(w * dict(c.meme.named_parameters())[name].detach() for w, c in zip(weights / weights.sum(), arrived))
    server.exchange(arrived, round_timer(server))
    assert server.upload_floats == 2 * fml_model_floats()
    torch.testing.assert_close(algorithm.global_meme[name], expected)
    server.send(server.clients[2:])
    torch.testing.assert_close(dict(server.clients[3].meme.named_parameters())[name], expected)


@pytest.mark.parametrize("flags,fragment", [(["-al", "1.5"], "-al"), (["-bt", "-0.1"], "-bt"),
                                            (["--fml_model", "nope"], "--fml_model")])
def test_fml_rejects_bad_flags(make_server, flags, fragment):
    with pytest.raises(UserError, match=fragment):
        make_server("FML", *FEW_SHOTS, *flags)


def test_fedgen_client_loss_adds_the_generated_feature_term(make_server, round_timer, fixed_batch):
    server = make_server("FedGen", *fast_flags("FedGen"))
    algorithm = server.algorithm
    client = server.clients[2]
    x, y = fixed_batch(client)
    client.model.eval()
    assert client.training_loss(x, y).item() == pytest.approx(F.cross_entropy(client.model(x), y).item(), rel=1e-6)

    server.exchange(server.clients, round_timer(server))
    counts = sum(torch.bincount(c.train_y, minlength=K) for c in server.clients).float()
    torch.testing.assert_close(algorithm.label_prior, counts / counts.sum())
    server.send([client])
    torch.testing.assert_close(client.model.head.weight, algorithm.global_head["weight"])

    state = client.rng.get_state()
    loss = client.training_loss(x, y).item()
    client.rng.set_state(state)
    labels = torch.multinomial(algorithm.label_prior, client.batch_size, replacement=True, generator=client.rng)
    noise = torch.randn(client.batch_size, NOISE_DIM, generator=client.rng)
    with torch.no_grad():
        features = algorithm.feature_generator.eval()(noise, labels)
        generated = F.cross_entropy(client.model.head(features), labels).item()
        expected = F.cross_entropy(client.model(x), y).item() + generated
    assert generated > 0 and loss == pytest.approx(expected, rel=1e-5)


def test_fedgen_generator_learns_from_the_heads(make_server, round_timer):
    server = make_server("FedGen", *fast_flags("FedGen"), "-se", "60", "-glr", "0.01")
    algorithm = server.algorithm
    for c in server.clients:
        c.train()
    labels = torch.arange(K).repeat(20)

    def global_head_loss():
        head = torch.nn.Linear(FEATURE_DIM, K)
        head.load_state_dict(algorithm.global_head)
        noise_rng = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return F.cross_entropy(head(algorithm.feature_generator.eval().sample(labels, noise_rng)), labels).item()

    algorithm.average_heads([client.upload() for client in server.clients])
    before = global_head_loss()
    server.exchange(server.clients, round_timer(server))
    assert global_head_loss() < before
