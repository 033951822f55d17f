"""The FedKTL head's switches for many classes: --etf_scale (s of the logits s * cos) and --logit_adjust (post-hoc
logit adjustment by the client's label prior at evaluation); the defaults keep the paper's head."""
import math

import pytest
import torch
import torch.nn.functional as F

from flcore.ktl_ops import arc_margin_logits, etf_cosines, log_label_prior
from flutils import experiment

FAST_KTL = ["FedKTL-stylegan-3", "-se", "5", "-sbs", "8", "--image_every", "0"]


def test_log_label_prior_is_the_add_one_smoothed_frequency():
    prior = log_label_prior(torch.tensor([0, 0, 0, 1]), 3)
    expected = torch.log(torch.tensor([4 / 7, 2 / 7, 1 / 7]))
    torch.testing.assert_close(prior, expected)
    assert math.isclose(float(prior.exp().sum()), 1.0, rel_tol=1e-6)


def test_defaults_are_the_papers_scaled_cosines(make_server, fixed_batch):
    client = make_server(*FAST_KTL).clients[0]
    client.model.eval()
    x, _ = fixed_batch(client)
    assert client.prior_shift is None and client.scale == 64.0
    assert torch.equal(client.scores(x), 64.0 * etf_cosines(client.model(x), client.etf))


def test_scale_multiplies_the_cosines_in_training_and_evaluation(make_server, fixed_batch):
    server = make_server(*FAST_KTL, "--etf_scale", "16")
    server.send(server.clients)  # the round's margin
    client = server.clients[0]
    client.model.eval()
    x, y = fixed_batch(client)
    cosines = etf_cosines(client.model(x), client.etf)
    torch.testing.assert_close(client.scores(x), 16.0 * cosines)
    expected = F.cross_entropy(arc_margin_logits(cosines, y, 16.0, client.margin), y)
    assert client.training_loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_logit_adjust_shifts_the_logits_by_tau_log_prior(make_server, fixed_batch):
    plain = make_server(*FAST_KTL).clients[1]
    adjusted = make_server(*FAST_KTL, "--logit_adjust", "0.5").clients[1]
    for client in (plain, adjusted):
        client.model.eval()
    x, _ = fixed_batch(plain)
    shift = adjusted.scores(x) - plain.scores(x)  # same seed: same models
    torch.testing.assert_close(shift, 0.5 * log_label_prior(plain.train_y, plain.num_classes).expand_as(shift))
    counts = torch.bincount(plain.train_y, minlength=plain.num_classes)
    assert shift[0, counts.argmax()] > shift[0, counts.argmin()]


@pytest.mark.parametrize("flags,fragment", [
    (["--etf_scale", "0"], "--etf_scale must be > 0"),
    (["--logit_adjust", "-1"], "--logit_adjust must be >= 0"),
])
def test_bad_prior_flags_are_one_line_errors(small_run, error_line, flags, fragment):
    assert fragment in error_line(experiment.main, small_run("-algo", "FedKTL-stylegan-3", *flags))


def test_flags_reach_every_client_through_the_spec(make_server):
    server = make_server(*FAST_KTL, "--logit_adjust", "1", "--etf_scale", "30")
    assert (server.config.algo.logit_adjust, server.config.algo.etf_scale) == (1.0, 30.0)
    assert all(client.scale == 30.0 and client.prior_shift is not None for client in server.clients)
