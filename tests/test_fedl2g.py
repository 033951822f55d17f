"""FedL2G-feat and FedL2G-logit: the guidance gradient, the server's step, the quiz split and what travels."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flcore.batching import shuffled_batches
from flcore.clients.clientbase import Client, ClientSetup
from flcore.clients.clientl2g import ClientFedL2G
from flcore.errors import UserError
from flcore.exchange import Payload
from flcore.servers.serverl2g import guidance_step
from flcore.trainmodel import BaseHeadSplit
from flutils import experiment
from flutils.data import ClientData

CPU = torch.device("cpu")
K, D, N, B = 3, 4, 40, 8  # classes, feature dim, training samples, batch size of the tiny setup
VARIANTS = ("feat", "logit")


def tiny_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, D))
    return BaseHeadSplit(base, nn.Linear(D, K), D, K, "tiny")


def tiny_data(n=N):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=generator)
    y = torch.arange(n) % K
    return ClientData(x, y, x[:6], y[:6])


def tiny_client(variant, lamda=1.0, data=None, quiz_batches=1, study_batches=2):
    setup = ClientSetup(client_id=0, model=tiny_model(), data=data or tiny_data(), seed=3, device=CPU, num_classes=K,
                        batch_size=B, local_epochs=1, learning_rate=0.1)
    return ClientFedL2G(setup, variant, lamda, quiz_batches, study_batches)


def guidance_payload(variant, train_model=True):
    dim = D if variant == "feat" else K
    guidance = torch.randn(K, dim, generator=torch.Generator().manual_seed(2))
    return Payload({"guidance": guidance}, config={"train_model": train_model})


def quiz_loss_after_pseudo_step(client, guidance, rng_state):
    """The quiz loss after one SGD step on the guided study loss, by plain autograd on a copy of the model and the
    batches the client's guidance step draws from `rng_state`: the reference the client's gradient must match."""
    model = copy.deepcopy(client.model)
    model.train()
    rng = torch.Generator().manual_seed(0)
    rng.set_state(rng_state)
    batches = shuffled_batches(client.num_train, client.batch_size, rng)[:client.study_batches]
    loss = 0.0
    for index in batches:
        x, y = client.train_x[index], client.train_y[index]
        features = model.base(x)
        logits = model.head(features)
        guided = features if client.variant == "feat" else logits
        loss = loss + F.cross_entropy(logits, y) + client.lamda * F.mse_loss(guided, guidance[y])
    model.zero_grad()
    (loss / len(batches)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= client.optimizer.param_groups[0]["lr"] * p.grad
    quiz = shuffled_batches(len(client.quiz_y), client.batch_size, rng)
    return sum(F.cross_entropy(model(client.quiz_x[i]), client.quiz_y[i]) for i in quiz) / len(quiz)


@pytest.mark.parametrize("variant", VARIANTS)
def test_guidance_gradient_equals_finite_differences_and_a_step_on_it_lowers_the_quiz_loss(variant):
    client = tiny_client(variant)
    client.model.double()
    client.train_x, client.quiz_x = client.train_x.double(), client.quiz_x.double()
    client.receive(guidance_payload(variant))
    client.guidance = client.guidance.double()
    state = client.guidance_rng.get_state()
    gradient, classes = client.guidance_gradient()
    assert classes.tolist() == [0, 1, 2] and gradient.shape == (3, client.guidance.shape[1])
    assert gradient.abs().max() > 0
    eps = 1e-6
    estimate = torch.zeros_like(client.guidance)
    for c in range(K):
        for j in range(client.guidance.shape[1]):
            step = torch.zeros_like(client.guidance)
            step[c, j] = eps
            estimate[c, j] = (quiz_loss_after_pseudo_step(client, client.guidance + step, state)
                              - quiz_loss_after_pseudo_step(client, client.guidance - step, state)) / (2 * eps)
    torch.testing.assert_close(gradient, estimate[classes], rtol=1e-5, atol=1e-9)
    before = quiz_loss_after_pseudo_step(client, client.guidance, state)
    after = quiz_loss_after_pseudo_step(client, client.guidance - 0.5 * gradient / gradient.norm(), state)
    assert after < before


def test_the_guidance_step_leaves_the_model_and_its_batchnorm_statistics_alone():
    client = tiny_client("feat")
    client.receive(guidance_payload("feat"))
    before = copy.deepcopy(client.model.state_dict())
    client.guidance_gradient()
    after = client.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_with_lambda_zero_training_is_local_training_on_the_study_set_bit_for_bit():
    data = tiny_data()
    client = tiny_client("feat", lamda=0.0, data=data)
    local = Client(ClientSetup(client_id=0, model=tiny_model(), data=ClientData(data.train_x[B:], data.train_y[B:],
                                                                                 data.test_x, data.test_y),
                               seed=3, device=CPU, num_classes=K, batch_size=B, local_epochs=1, learning_rate=0.1))
    for _ in range(3):
        client.receive(guidance_payload("feat"))
        for c in (client, local):
            torch.manual_seed(5)
            c.train()
    assert client.upload().tensors["grads"].abs().max() == 0, "lambda 0: the guidance cannot change the step"
    theirs = local.model.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in client.model.state_dict().items())


def test_quiz_samples_are_held_out_of_training_and_only_reach_the_guidance_gradient():
    data = tiny_data()
    poisoned = data.train_x.clone()
    poisoned[:B] = float("nan")  # the first -mqb x -lbs samples are the quiz set
    client = tiny_client("logit", data=ClientData(poisoned, data.train_y, data.test_x, data.test_y))
    assert len(client.train_y) == N - B and len(client.quiz_y) == B
    client.receive(guidance_payload("logit"))
    client.train()
    assert all(torch.isfinite(p).all() for p in client.model.parameters()), "a quiz sample was trained on"
    assert torch.isnan(client.upload().tensors["grads"]).all(), "the guidance gradient comes from the quiz set"


def test_warm_up_rounds_learn_the_guidance_without_training_the_model():
    client = tiny_client("feat")
    before = copy.deepcopy(client.model.state_dict())
    client.receive(guidance_payload("feat", train_model=False))
    client.train()
    assert all(torch.equal(value, before[name]) for name, value in client.model.state_dict().items())
    assert client.upload().floats() == K * D


def test_a_quiz_set_that_takes_all_the_data_is_a_clear_error():
    with pytest.raises(UserError, match="-mqb 5 x -lbs 8 = 40 quiz samples"):
        tiny_client("feat", quiz_batches=5)


@pytest.mark.parametrize("variant,dim", [("feat", 64), ("logit", 10)])
def test_each_way_the_payloads_carry_the_guidance_and_its_gradient_rows(make_server, variant, dim):
    runner = make_server(f"FedL2G-{variant}")
    server = runner.algorithm
    sent = server.payload_for(0)
    assert sent.tensors["guidance"].shape == (10, dim) and sent.floats() == 10 * dim
    data = runner.dataset.clients[0]
    client = server.new_client(ClientSetup(client_id=0, model=copy.deepcopy(runner.clients[0].model), data=data,
                                           seed=0, device=CPU, num_classes=10, batch_size=10, local_epochs=1,
                                           learning_rate=0.01), runner.spec)
    client.receive(sent)
    rng = torch.Generator()
    rng.set_state(client.guidance_rng.get_state())
    study = shuffled_batches(client.num_train, 10, rng)[0]
    client.train()
    upload = client.upload()
    classes = torch.unique(client.train_y[study])
    assert torch.equal(upload.tensors["classes"], classes)
    assert upload.floats() == len(classes) * dim and upload.tensors["grads"].shape == (len(classes), dim)


def test_the_server_steps_on_the_per_class_mean_of_the_uploaded_gradients(make_server, round_timer):
    runner = make_server("FedL2G-feat", "-slr", "0.5")
    server = runner.algorithm
    start = server.guidance.clone()
    a = torch.full((2, 64), 0.01)
    b = torch.full((1, 64), 0.03)
    uploads = {0: Payload({"grads": a, "classes": torch.tensor([1, 4])}),
               2: Payload({"grads": b, "classes": torch.tensor([4])}),
               3: Payload()}  # a warm-up client before its first guidance
    assert server.aggregate(uploads, round_timer(server)) == {}
    step = start - server.guidance
    torch.testing.assert_close(step[1], torch.full((64,), 0.5 * 0.01))
    torch.testing.assert_close(step[4], torch.full((64,), 0.5 * 0.02), msg="class 4: the mean of two uploads")
    others = [c for c in range(10) if c not in (1, 4)]
    assert torch.equal(step[others], torch.zeros(8, 64)), "a class nobody uploaded keeps its vector"


def test_the_averaged_gradient_is_clipped_to_norm_100():
    guidance = torch.zeros(3, 2)
    stepped = guidance_step(guidance, torch.tensor([[300.0, 400.0]]), torch.tensor([2]), 1.0)
    torch.testing.assert_close(stepped[2].norm(), torch.tensor(100.0))
    assert torch.equal(stepped[:2], torch.zeros(2, 2))


def test_end_to_end_counts_k_by_d_down_and_class_rows_up(small_run, results_of):
    argv = small_run("-algo", "FedL2G-logit", "-gr", "1")
    assert experiment.main(argv) == 0
    data = results_of(argv)
    assert data["rs_test_acc"].max() > 0.1
    assert data["download_floats"].tolist() == [4 * 10 * 10]
    (up,) = data["upload_floats"].tolist()
    assert up % 10 == 0 and 4 * 10 <= up <= 4 * 10 * 10


@pytest.mark.parametrize("flags,fragment", [(("-mqb", "0"), "-mqb must be >= 1"), (("-mdb", "0"), "-mdb must be"),
                                            (("-slr", "0"), "-slr must be > 0"), (("-lam", "-1"), "-lam must be"),
                                            (("-wu", "-1"), "-wu must be"),
                                            (("-mqb", "100"), "lower -mqb")])
def test_bad_flags_are_one_line_errors(small_run, error_line, flags, fragment):
    assert fragment in error_line(experiment.main, small_run("-algo", "FedL2G-feat", *flags))
