"""FedFTG: the class-level ensemble and label sampling, the generator's loss going down, fine-tuning moving the
global model towards the ensemble on generated inputs, communication counted by hand, and the refusal of a
heterogeneous family."""
import copy

import numpy as np
import pytest
import torch

from flcore.fedavg import shared_state
from flcore.ftg_ops import (
    ConditionalGenerator,
    FineTuneSettings,
    class_ensemble_weights,
    distill_loss,
    diversity_loss,
    ensemble_kl,
    ensemble_logits,
    fine_tune,
    generator_loss,
    label_distribution,
    sample_batch,
)
from flcore.parameters import float_count
from flcore.trainmodel import build_model
from flutils import experiment

K, SHAPE, NOISE = 10, (3, 16, 16), 16
HEAD_SCALE = 20.0
SMALL_FTG = ["-m", "tiny_cnn", "--ftg_iterations", "2", "--ftg_batch_size", "8", "--ftg_generator_width", "8"]


def tiny_model(seed):
    torch.manual_seed(seed)
    return build_model("tiny_cnn", K, 16, SHAPE[0], SHAPE[1])


def confident(state):
    """A randomly initialized model's state with its head scaled up, so its predictions are far from uniform, as a
    trained client's are."""
    return {name: value * HEAD_SCALE if name.startswith("head.") else value for name, value in state.items()}


@pytest.fixture
def federation():
    """A global model, a teacher module, three clients' states and their label counts (class 9 held by none)."""
    student = tiny_model(0).eval()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    states = [confident(shared_state(tiny_model(seed))) for seed in (1, 2, 3)]
    counts = torch.tensor([[5, 0, 3, 1, 0, 2, 8, 1, 4, 0],
                           [0, 7, 3, 0, 6, 2, 0, 1, 4, 0],
                           [1, 1, 0, 9, 2, 0, 0, 6, 0, 0]], dtype=torch.float)
    return student, teacher, states, counts


def test_class_ensemble_weights_and_label_distribution(federation):
    *_, counts = federation
    weights = class_ensemble_weights(counts)
    held = counts.sum(0) > 0
    torch.testing.assert_close(weights.sum(0)[held], torch.ones(int(held.sum())))
    assert torch.all(weights[:, ~held] == 0) and torch.all(weights[counts == 0] == 0)
    torch.testing.assert_close(weights[:, 2], torch.tensor([0.5, 0.5, 0.0]))
    prior = label_distribution(counts)
    torch.testing.assert_close(prior, counts.sum(0) / counts.sum())
    labels = torch.multinomial(prior, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert not torch.any(labels == 9), "a class no client holds is never sampled"
    np.testing.assert_allclose(torch.bincount(labels, minlength=K).numpy() / 20000, prior.numpy(), atol=0.01)


def test_ensemble_logits_weigh_each_sample_by_its_label(federation):
    _, teacher, states, counts = federation
    images = torch.randn(4, *SHAPE)
    labels = torch.tensor([0, 1, 3, 6])
    models = [tiny_model(seed).eval() for seed in (1, 2, 3)]
    for model, state in zip(models, states):
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        got = ensemble_logits(teacher, states, class_ensemble_weights(counts), images, labels)
        for i, label in enumerate(labels.tolist()):
            expected = sum(counts[k, label] / counts[:, label].sum() * models[k](images[i:i + 1])[0]
                           for k in range(3))
            torch.testing.assert_close(got[i], expected)


def test_diversity_loss_rewards_images_that_differ_as_their_noise_does():
    noise = torch.randn(6, NOISE)
    same = torch.zeros(6, *SHAPE)
    assert diversity_loss(noise, same).item() == pytest.approx(1.0)
    assert diversity_loss(noise, torch.randn(6, *SHAPE)).item() < 0.5


def test_generator_loss_decreases(federation):
    student, teacher, states, counts = federation
    torch.manual_seed(0)
    generator = ConditionalGenerator(NOISE, K, SHAPE, width=8)
    optimizer = torch.optim.Adam(generator.parameters(), lr=0.01)
    weights = class_ensemble_weights(counts)
    noise, labels = sample_batch(label_distribution(counts), 16, NOISE, torch.Generator().manual_seed(0), "cpu")
    student.requires_grad_(False)
    losses, parts = [], []
    for _ in range(40):
        loss, part = generator_loss(generator, teacher, states, weights, student, noise, labels, 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        parts.append(part)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    assert parts[-1]["fidelity"] < parts[0]["fidelity"], "the ensemble predicts the sampled labels better"
    # The hard-sample term enters with a minus sign: the generator seeks the global model's disagreement.
    last = parts[-1]
    loss, _ = generator_loss(generator, teacher, states, weights, student, noise, labels, 2.0, 0.5)
    expected = last["fidelity"] - 2.0 * last["hardness"] + 0.5 * last["diversity"]
    assert loss.item() != pytest.approx(losses[-1]) and loss.item() == pytest.approx(expected, rel=0.05, abs=0.05)
    assert all(p.grad is None for p in student.parameters()), "the global model is not trained by the generator"


def test_distillation_moves_the_global_model_towards_the_ensemble(federation):
    student, teacher, states, counts = federation
    weights = class_ensemble_weights(counts)
    noise, labels = sample_batch(label_distribution(counts), 16, NOISE, torch.Generator().manual_seed(1), "cpu")
    images = ConditionalGenerator(NOISE, K, SHAPE, width=8)(noise, labels).detach()
    with torch.no_grad():
        ensemble = ensemble_logits(teacher, states, weights, images, labels)
    before = ensemble_kl(ensemble, student(images)).item()
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    for _ in range(30):
        loss = distill_loss(student, ensemble, images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = ensemble_kl(ensemble, student(images)).item()
    assert after < 0.5 * before, (before, after)


def test_fine_tune_brings_the_global_model_closer_to_the_ensemble_on_generated_inputs(federation):
    student, teacher, states, counts = federation
    averaged = copy.deepcopy(student)
    torch.manual_seed(0)
    generator = ConditionalGenerator(NOISE, K, SHAPE, width=8)
    settings = FineTuneSettings(iterations=10, generator_steps=1, distill_steps=5, batch_size=16, beta_tran=1.0,
                                beta_div=1.0, learning_rate=0.3)
    metrics = fine_tune(student, teacher, states, counts, generator, torch.optim.Adam(generator.parameters(), 0.01),
                        settings, torch.Generator().manual_seed(0))
    assert all(np.isfinite(v) for v in metrics.values())
    # Inputs of the generator as trained: the fine-tuned model agrees with the ensemble better than the average did.
    weights = class_ensemble_weights(counts)
    noise, labels = sample_batch(label_distribution(counts), 32, NOISE, torch.Generator().manual_seed(5), "cpu")
    with torch.no_grad():
        images = generator(noise, labels)
        ensemble = ensemble_logits(teacher, states, weights, images, labels)
        after, before = ensemble_kl(ensemble, student(images)), ensemble_kl(ensemble, averaged(images))
    assert after < 0.8 * before, (before, after)
    assert not student.training and not any(p.requires_grad is False for p in student.parameters())


def test_fedftg_end_to_end_communication(small_run, results_of):
    argv = small_run("-algo", "FedFTG", "-gr", "2", *SMALL_FTG)
    assert experiment.main(argv) == 0
    data = results_of(argv)
    model_floats = float_count(shared_state(build_model("tiny_cnn", K, 64, 3, 32)))
    # Every client receives the global model and uploads its trained model and its K label counts.
    assert np.all(data["download_floats"] == 4 * model_floats)
    assert np.all(data["upload_floats"] == 4 * (model_floats + K))
    assert np.all(np.isfinite(data["generator_loss"])) and np.all(np.isfinite(data["distill_loss"]))
    assert len(data["time_fine_tune"]) == 2


@pytest.mark.parametrize("algorithm", ["FedFTG", "FGL"])
def test_a_heterogeneous_family_is_refused(small_run, error_line, algorithm):
    line = error_line(experiment.main, small_run("-algo", algorithm, "-GPath", "unused"))
    assert "-m HtCPU4 mixes 4" in line and "-m <one model name>" in line and "-m tiny_cnn" in line


@pytest.mark.parametrize("flags, fragment", [
    (["--ftg_batch_size", "1"], "--ftg_batch_size"),
    (["--ftg_iterations", "0"], "--ftg_iterations"),
    (["-m", "no_such_model"], "unknown model family"),
])
def test_fedftg_bad_flags(small_run, error_line, flags, fragment):
    assert fragment in error_line(experiment.main, small_run("-algo", "FedFTG", "-m", "tiny_cnn", *flags))
