import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flcore.ktl_ops import (
    FeatureTransformer,
    align_domains,
    arc_margin_logits,
    arc_margin_loss,
    class_mean_reset,
    etf_cosines,
    knowledge_transfer_loss,
    mmd_rbf,
    prototype_batches,
    simplex_etf,
)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ---- simplex ETF ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [2, 3, 10, 100])
def test_etf_columns_are_unit_with_equal_negative_cosine(num_classes):
    etf = simplex_etf(num_classes, seeded(0), dtype=torch.float64)
    assert etf.shape == (num_classes, num_classes)
    gram = etf.T @ etf
    expected = torch.full((num_classes, num_classes), -1.0 / (num_classes - 1),
                          dtype=torch.float64)
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(gram, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(etf.sum(dim=1), torch.zeros(num_classes, dtype=torch.float64),
                               atol=1e-10, rtol=0)


def test_etf_is_determined_by_the_seed():
    first = simplex_etf(7, seeded(3))
    assert torch.equal(first, simplex_etf(7, seeded(3)))
    assert not torch.allclose(first, simplex_etf(7, seeded(4)))


def test_etf_follows_dtype_and_spans_the_centered_subspace():
    etf = simplex_etf(5, seeded(1), dtype=torch.float64)
    assert etf.dtype == torch.float64 and etf.device.type == "cpu"
    assert torch.linalg.matrix_rank(etf).item() == 4
    assert simplex_etf(5, seeded(1)).dtype == torch.float32


def test_etf_rejects_a_single_class():
    with pytest.raises(ValueError, match="num_classes >= 2"):
        simplex_etf(1, seeded(0))


def test_etf_cosines_by_hand():
    features = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    torch.testing.assert_close(etf_cosines(features, torch.eye(3)),
                               torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, -1.0]]))
    etf = simplex_etf(3, seeded(2))
    expected = torch.tensor([[sum(features[b, j] / features[b].norm() * etf[j, c]
                                  for j in range(3)) for c in range(3)] for b in range(2)])
    torch.testing.assert_close(etf_cosines(features, etf), expected)


# ---- margin loss ---------------------------------------------------------------------------

def test_margin_logits_known_values():
    cosines = torch.tensor([[0.5, 0.2, -0.1], [0.3, -0.4, 0.9]])
    labels = torch.tensor([0, 2])
    logits = arc_margin_logits(cosines, labels)
    expected = torch.tensor([[64 * math.cos(math.pi / 3 + 0.5), 64 * 0.2, 64 * -0.1],
                             [64 * 0.3, 64 * -0.4, 64 * math.cos(math.acos(0.9) + 0.5)]])
    torch.testing.assert_close(logits, expected)
    custom = arc_margin_logits(cosines[:1], labels[:1], scale=10.0, margin=0.2)
    torch.testing.assert_close(custom[0, 0], torch.tensor(10 * math.cos(math.pi / 3 + 0.2)))


def test_zero_margin_is_exactly_scaled_cosine():
    cosines = torch.rand(6, 4, generator=seeded(0)) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.equal(arc_margin_logits(cosines, labels, scale=30.0, margin=0.0), 30.0 * cosines)


@pytest.mark.parametrize("true_cosine", [1.0, -1.0])
def test_margin_is_finite_at_the_arccos_boundaries(true_cosine):
    cosines = torch.tensor([[true_cosine, 0.0, 0.1], [0.2, true_cosine, -0.3]],
                           requires_grad=True)
    labels = torch.tensor([0, 1])
    logits = arc_margin_logits(cosines, labels)
    assert torch.isfinite(logits).all()
    loss = arc_margin_loss(cosines, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cosines.grad).all()


def test_margin_loss_is_cross_entropy_of_the_logits():
    cosines = torch.tensor([[0.5, 0.2, -0.1]])
    labels = torch.tensor([0])
    logits = [64 * math.cos(math.pi / 3 + 0.5), 64 * 0.2, 64 * -0.1]
    expected = -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert arc_margin_loss(cosines, labels).item() == pytest.approx(expected, rel=1e-5)


def test_margin_logits_reject_mismatched_labels():
    with pytest.raises(ValueError, match="labels \\[B\\]"):
        arc_margin_logits(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def test_knowledge_transfer_loss_is_mse_and_checks_shapes():
    projected = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert knowledge_transfer_loss(projected, targets).item() == pytest.approx((4 + 9) / 4)
    with pytest.raises(ValueError, match="latent_dim"):
        knowledge_transfer_loss(projected, targets[:, :1])


# ---- MMD -----------------------------------------------------------------------------------

def test_mmd_single_points_by_hand():
    distance = 3.0
    value = mmd_rbf(torch.zeros(1, 2), torch.tensor([[distance, 0.0]]))
    kernel = sum(math.exp(-distance ** 2 / (2 * a)) for a in (10, 15, 20, 50))
    assert value.item() == pytest.approx(2 * 4 - 2 * kernel, rel=1e-5)
    narrow = mmd_rbf(torch.zeros(1, 2), torch.tensor([[distance, 0.0]]), bandwidths=(1.0,))
    assert narrow.item() == pytest.approx(2 - 2 * math.exp(-4.5), rel=1e-5)


def test_mmd_is_zero_for_identical_samples_and_symmetric():
    x = torch.randn(20, 8, generator=seeded(0)) * 5
    assert abs(mmd_rbf(x, x.clone()).item()) < 1e-5
    y = torch.randn(15, 8, generator=seeded(1)) + 1.0
    assert mmd_rbf(x, y).item() == pytest.approx(mmd_rbf(y, x).item(), abs=1e-6)


def test_mmd_grows_with_the_mean_shift():
    x = torch.randn(64, 4, generator=seeded(0))
    y = torch.randn(64, 4, generator=seeded(1))
    values = [mmd_rbf(x, y + shift).item() for shift in (0.0, 1.0, 2.0, 4.0, 8.0)]
    assert all(later > earlier for earlier, later in zip(values, values[1:]))
    assert values[0] < 0.1 * values[-1]


def test_mmd_survives_rounding_of_far_away_coinciding_points():
    # Far from the origin, the expanded ||u||^2 + ||v||^2 - 2<u, v> rounds below zero.
    x = torch.randn(20, 8, generator=seeded(0)) + 1000.0
    value = mmd_rbf(x, x.clone(), bandwidths=(1e-6,))
    assert torch.isfinite(value) and abs(value.item()) < 1e-6


def test_mmd_gradient_is_finite_for_coinciding_points():
    x = torch.randn(5, 3, generator=seeded(0), requires_grad=True)
    mmd_rbf(x, x.detach()).backward()
    assert torch.isfinite(x.grad).all()


def test_mmd_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="\\[n, d\\] and \\[m, d\\]"):
        mmd_rbf(torch.zeros(3, 4), torch.zeros(3, 5))


# ---- transformer, centroids, batching ------------------------------------------------------

def test_feature_transformer_shape_and_layers():
    transformer = FeatureTransformer(10, 32)
    assert transformer(torch.randn(7, 10, generator=seeded(0))).shape == (7, 32)
    kinds = [type(layer) for layer in transformer.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_class_mean_reset_sets_present_classes_only():
    centroids = nn.Parameter(torch.full((4, 2), 7.0))
    mapped = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, -1.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 2])
    class_mean_reset(centroids, mapped, labels)
    expected = torch.tensor([[2.0, 4.0], [7.0, 7.0], [2.5, -0.5], [7.0, 7.0]])
    assert torch.equal(centroids.data, expected)
    assert centroids.grad is None and centroids.requires_grad


def test_class_mean_reset_passes_present_class_means_through_renderable():
    centroids = torch.full((3, 2), 7.0)
    mapped = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -4.0]])
    class_mean_reset(centroids, mapped, torch.tensor([0, 0, 2]), renderable=lambda rows: 2 * F.normalize(rows, dim=1))
    half = math.sqrt(2.0)
    assert torch.allclose(centroids, torch.tensor([[half, half], [7.0, 7.0], [0.0, -2.0]]))


def test_class_mean_reset_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must lie in"):
        class_mean_reset(torch.zeros(3, 2), torch.zeros(2, 2), torch.tensor([0, 3]))


@pytest.mark.parametrize("count,batch_size,sizes", [(201, 100, [100, 101]), (3, 2, [3]),
                                                   (2, 100, [2]), (10, 5, [5, 5])])
def test_prototype_batches_cover_everything_without_singletons(count, batch_size, sizes):
    batches = prototype_batches(count, batch_size, seeded(0))
    assert [len(batch) for batch in batches] == sizes
    assert sorted(torch.cat(batches).tolist()) == list(range(count))


def test_prototype_batches_are_shuffled_by_the_generator():
    first = torch.cat(prototype_batches(50, 20, seeded(5)))
    assert torch.equal(first, torch.cat(prototype_batches(50, 20, seeded(5))))
    assert not torch.equal(first, torch.arange(50))
    assert not torch.equal(first, torch.cat(prototype_batches(50, 20, seeded(6))))


def test_prototype_batches_reject_bad_sizes():
    with pytest.raises(ValueError, match="at least 2 prototypes"):
        prototype_batches(1, 100, seeded(0))
    with pytest.raises(ValueError, match="batch size must be at least 2"):
        prototype_batches(10, 1, seeded(0))


# ---- domain alignment ----------------------------------------------------------------------

NUM_CLASSES, LATENT_DIM = 5, 8


def alignment_setup(seed=0):
    torch.manual_seed(seed)
    transformer = FeatureTransformer(NUM_CLASSES, LATENT_DIM)
    centroids = nn.Parameter(torch.randn(NUM_CLASSES, LATENT_DIM))
    labels = torch.arange(40) % 4  # class 4 has no prototype
    prototypes = F.normalize(torch.randn(40, NUM_CLASSES) + 2 * F.one_hot(labels, NUM_CLASSES),
                             dim=1)
    optimizer = torch.optim.Adam(list(transformer.parameters()) + [centroids], lr=0.01)
    return transformer, centroids, prototypes, labels, optimizer


def valid_sampler(seed=0):
    source = seeded(seed)
    return lambda count: torch.randn(count, LATENT_DIM, generator=source) + 3.0


def run_alignment(epochs, lamda=1.0, labels=None, use_mmd=True, seed=0):
    transformer, centroids, prototypes, default_labels, optimizer = alignment_setup(seed)
    labels = default_labels if labels is None else labels
    absent_before = centroids.detach()[4].clone()
    stats = align_domains(transformer, centroids, prototypes, labels, valid_sampler(),
                          optimizer, epochs=epochs, batch_size=16, lamda=lamda,
                          rng=seeded(1), use_mmd=use_mmd)
    return stats, transformer, centroids, prototypes, labels, absent_before


def test_align_domains_lowers_the_loss():
    first_epoch, *_ = run_alignment(epochs=1)
    last_epoch, *_ = run_alignment(epochs=30)
    assert first_epoch["steps"] == 3 and last_epoch["steps"] == 90
    assert last_epoch["loss"] < 0.7 * first_epoch["loss"]
    assert last_epoch["mmd"] < first_epoch["mmd"]
    assert last_epoch["loss"] == pytest.approx(last_epoch["mmd"] + last_epoch["centroid"])


def test_align_domains_leaves_centroids_at_class_means():
    _, transformer, centroids, prototypes, labels, absent_before = run_alignment(epochs=5)
    assert not transformer.training
    with torch.no_grad():
        mapped = transformer(prototypes)
    for label in range(4):
        torch.testing.assert_close(centroids.detach()[label], mapped[labels == label].mean(0))
    # Class 4 has no prototype: only its (zero) Adam steps could move it, so it stays.
    torch.testing.assert_close(centroids.detach()[4], absent_before)


def test_zero_lambda_ignores_the_centroid_term():
    regrouped = torch.arange(40) // 10  # another partition: other centroids, other MSE term
    runs = {(lamda, name): run_alignment(epochs=3, lamda=lamda, labels=labels)
            for lamda in (0.0, 1.0) for name, labels in (("default", None), ("regrouped", regrouped))}

    def transformer_state(run):
        return run[1].state_dict()

    for key, value in transformer_state(runs[(0.0, "default")]).items():
        assert torch.equal(value, transformer_state(runs[(0.0, "regrouped")])[key]), key
    weight = "layers.3.weight"
    assert not torch.equal(transformer_state(runs[(1.0, "default")])[weight],
                           transformer_state(runs[(1.0, "regrouped")])[weight])


def test_align_domains_without_mmd_only_pulls_to_centroids():
    stats, *_ = run_alignment(epochs=3, use_mmd=False)
    assert stats["mmd"] == 0.0
    assert stats["loss"] == pytest.approx(stats["centroid"])


def test_align_domains_is_deterministic():
    first_stats, first_transformer, first_centroids, *_ = run_alignment(epochs=4)
    second_stats, second_transformer, second_centroids, *_ = run_alignment(epochs=4)
    assert first_stats == second_stats
    assert torch.equal(first_centroids, second_centroids)
    for key, value in first_transformer.state_dict().items():
        assert torch.equal(value, second_transformer.state_dict()[key]), key


def test_align_domains_rejects_a_single_prototype_before_touching_centroids():
    transformer, centroids, prototypes, labels, optimizer = alignment_setup()
    before = centroids.detach().clone()
    with pytest.raises(ValueError, match="at least 2 prototypes"):
        align_domains(transformer, centroids, prototypes[:1], labels[:1], valid_sampler(),
                      optimizer, epochs=1, batch_size=16, lamda=1.0, rng=seeded(0))
    assert torch.equal(centroids.detach(), before)
