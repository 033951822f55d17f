"""Client model registry and FedKTL model families (flcore.trainmodel)."""
import math
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from flcore.trainmodel import (
    FAMILIES,
    FAMILY_ALIASES,
    HEADS,
    HTC4,
    BaseHeadSplit,
    build_family_model,
    build_model,
    families,
    family_models,
    list_models,
    model_with_state,
    register_model,
    registry,
    split_model_name,
    with_heads,
)

NUM_CLASSES = 3
VIT_MODELS = ("vit_b_16", "vit_b_32")
# (in_channels, image_size, feature_dim): the non-default feature_dim exercises the pooled-feature path of
# backbones whose natural width is 512, and the default one the identity path.
INPUT_CASES = [(1, 28, 512), (3, 32, 200), (3, 64, 512)]

@pytest.mark.parametrize("in_channels,image_size,feature_dim", INPUT_CASES,
                         ids=[f"{c}x{s}x{s}-fd{d}" for c, s, d in INPUT_CASES])
@pytest.mark.parametrize("name", list_models())
def test_model_shapes_and_gradients(name, in_channels, image_size, feature_dim):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, feature_dim=feature_dim, in_channels=in_channels, image_size=image_size)
    assert isinstance(model, BaseHeadSplit)
    assert (model.model_name, model.feature_dim, model.num_classes) == (name, feature_dim, NUM_CLASSES)
    head_linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert head_linears[0].in_features == feature_dim and head_linears[-1].out_features == NUM_CLASSES
    assert len(head_linears) == (2 if name in VIT_MODELS else 1)

    images = torch.randn(2, in_channels, image_size, image_size)
    features = model.base(images)
    assert features.shape == (2, feature_dim)
    logits = model.head(features)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()

    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    not_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing and not not_finite


def test_forward_is_head_of_base():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", NUM_CLASSES).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), model.head(model.base(images)))


@pytest.mark.parametrize("name", VIT_MODELS)
def test_vit_head_structure_and_resize(name):
    torch.manual_seed(0)
    model = build_model(name, 7, feature_dim=256).eval()
    assert [type(m) for m in model.head] == [nn.Linear, nn.Tanh, nn.Linear]
    assert (model.head[0].in_features, model.head[0].out_features) == (256, 768)
    assert (model.head[2].in_features, model.head[2].out_features) == (768, 7)
    # A 64 px input is resized to 32 px inside the base: same features as resizing beforehand.
    images = torch.randn(2, 3, 64, 64)
    resized = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(model.base(images), model.base(resized), atol=1e-6)


def test_cnn4_flatten_size_follows_input_size():
    for image_size, side in ((28, 4), (32, 5), (64, 13)):
        hidden = build_model("cnn4", NUM_CLASSES, feature_dim=64, image_size=image_size).base[-2]
        assert (hidden.in_features, hidden.out_features) == (64 * side * side, 64)


def test_feature_pool_adds_no_parameters():
    def base_parameters(feature_dim):
        model = build_model("tiny_mobilenet", NUM_CLASSES, feature_dim=feature_dim)
        return sum(p.numel() for p in model.base.parameters())

    assert base_parameters(100) == base_parameters(256) == base_parameters(1024)


@pytest.mark.parametrize("name,first_conv,expected_std", [
    # torchvision ResNets: kaiming normal (fan_out) -> sqrt(2 / (64 * 7 * 7)) whatever in_channels is.
    ("resnet18", lambda base: base.conv1, math.sqrt(2 / (64 * 49))),
    # ViT-B/16 patchify stem: std sqrt(1 / fan_in) with fan_in = 1 * 16 * 16 for one channel.
    ("vit_b_16", lambda base: base[1].conv_proj, math.sqrt(1 / 256)),
])
def test_single_channel_stem_keeps_the_library_init_scale(name, first_conv, expected_std):
    torch.manual_seed(0)
    conv = first_conv(build_model(name, NUM_CLASSES, in_channels=1).base)
    assert conv.in_channels == 1 and conv.weight.shape[1] == 1
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.1)


@pytest.mark.parametrize("name", ["cnn4", "resnet10", "tiny_mixer", "mobilenet_v2", "googlenet"])
def test_init_is_driven_by_the_torch_seed_only(name):
    def state_after_seed(seed):
        torch.manual_seed(seed)
        random.seed(seed + 100)
        np.random.seed(seed + 200)
        python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
        state = build_model(name, NUM_CLASSES, in_channels=1, image_size=28).state_dict()
        # Building must not consume other generators.
        assert random.getstate() == python_state
        assert np.array_equal(np.random.get_state()[1], numpy_state)
        return state

    first, again, other = state_after_seed(0), state_after_seed(0), state_after_seed(1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first if first[key].is_floating_point())


def test_unknown_model_error_lists_choices():
    with pytest.raises(ValueError) as error:
        build_model("resnet5", NUM_CLASSES)
    message = str(error.value)
    assert message.startswith(f"unknown model 'resnet5'; choose from: {', '.join(list_models())} (optionally +head")
    assert "\n" not in message and "tiny_mixer" in message and "vit_b_32" in message


@pytest.mark.parametrize("kwargs,fragment", [
    ({"num_classes": 0}, "num_classes must be an integer >= 1, got 0"),
    ({"num_classes": 10, "feature_dim": 0}, "feature_dim must be an integer >= 1, got 0"),
    ({"num_classes": 10, "in_channels": 4}, "in_channels must be 1 (grayscale) or 3 (RGB), got 4"),
    ({"num_classes": 10, "image_size": 8}, "image_size must be an integer >= 16, got 8"),
])
def test_bad_build_arguments_are_rejected(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        build_model("tiny_cnn", **kwargs)


def test_register_model_adds_a_buildable_name(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("probe_mlp")
    def probe(feature_dim, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, feature_dim))

    assert "probe_mlp" in list_models()
    model = build_model("probe_mlp", 5, feature_dim=8, in_channels=1, image_size=16)
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 5)
    with pytest.raises(ValueError, match="model 'probe_mlp' is already registered"):
        register_model("probe_mlp")(probe)
    with pytest.raises(ValueError, match="lowercase"):
        register_model("ProbeMLP")
    with pytest.raises(ValueError, match="without '\\+'"):
        register_model("probe+mlp")
    with pytest.raises(ValueError, match="unknown head 'wide'"):
        register_model("probe_wide", head="wide")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_member_is_a_registered_base_with_a_registered_head(family):
    # test_model_shapes_and_gradients builds and runs every registered base, and
    # test_every_family_builds_each_client_model every member's head on a small stand-in base.
    pairs = [split_model_name(name) for name in family_models(family)]
    assert {base for base, _ in pairs} <= set(list_models()) and {head for _, head in pairs} <= set(HEADS)


def test_family_models_returns_a_copy():
    before = family_models("HtFE2")
    family_models("HtFE2").append("resnet152")
    assert family_models("HtFE2") == before


def test_unknown_family_error_lists_choices():
    with pytest.raises(ValueError) as error:
        family_models("HtFE6")
    message = str(error.value)
    assert message.startswith("unknown model family 'HtFE6'") and "\n" not in message
    assert all(name in message for name in FAMILIES) and "resnet152" in message
    with pytest.raises(ValueError, match="unknown model family 'htfe8'"):
        build_family_model("htfe8", 0, NUM_CLASSES)


def test_a_model_name_is_a_family_of_one():
    assert family_models("cnn4") == ["cnn4"]
    assert build_family_model("cnn4", 3, NUM_CLASSES).model_name == "cnn4"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_client_index_cycles_through_the_family(family, monkeypatch):
    # Record which model each client would get, without building the large ones.
    monkeypatch.setattr(families, "build_model", lambda name, *args: (name, args))
    models = FAMILIES[family]
    for client_index in range(2 * len(models) + 1):
        name, args = build_family_model(family, client_index, 10, 64, 1, 28)
        assert name == models[client_index % len(models)]
        assert args == (10, 64, 1, 28)


def test_cpu_family_builds_each_client_model():
    members = family_models("HtCPU4")
    for index in range(len(members) + 2):
        model = build_family_model("HtCPU4", index, 10, image_size=28, in_channels=1)
        assert model.model_name == members[index % len(members)]
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_negative_client_index_is_rejected():
    with pytest.raises(ValueError, match="client_index must be an integer >= 0, got -1"):
        build_family_model("HtCPU4", -1, NUM_CLASSES)


@pytest.mark.parametrize("name", FAMILIES["HtCPU4"])
def test_cpu_family_models_are_small(name):
    model = build_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_a_shared_model_built_from_its_state_leaves_the_global_random_stream_alone():
    """FML's meme and FedKD's mentee arrive as states; building them must not move the stream the client's own
    layers (FedKD's hidden map) are drawn from, or the client would differ from one given a copy."""
    state = build_model("cnn4", 10, 64, 3, 32).state_dict()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    model = model_with_state("cnn4", 10, 64, 3, 32, state)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in state.items())


def head_widths(head):
    """(in, out) of each Linear in the head, in order."""
    return [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]


@pytest.fixture
def small_bases(monkeypatch):
    """Every registered base replaced by a one-layer stand-in (each keeps its own head), so that every family's
    client models build in milliseconds; the real bases are built by test_model_shapes_and_gradients."""
    def stand_in(feature_dim, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, feature_dim))

    monkeypatch.setattr(registry, "_REGISTRY", {name: (stand_in, head) for name, (_, head)
                                                in registry._REGISTRY.items()})


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(FAMILY_ALIASES))
def test_every_family_builds_each_client_model(family, small_bases):
    members = family_models(family)
    expected_widths = {"linear": [(32, NUM_CLASSES)], "vit": [(32, 768), (768, NUM_CLASSES)],
                       **{f"mlp{w}": [(32, w), (w, NUM_CLASSES)] for w in (512, 256, 128)}}
    for index in range(len(members) + 1):
        model = build_family_model(family, index, NUM_CLASSES, feature_dim=32, in_channels=1, image_size=16)
        name = members[index % len(members)]
        assert model.model_name == name
        assert head_widths(model.head) == expected_widths[split_model_name(name)[1]]
        assert model(torch.zeros(2, 1, 16, 16)).shape == (2, NUM_CLASSES)
        # The name alone rebuilds the same architecture (FML's meme, FedKD's mentee, -pc workers, checkpoints).
        rebuilt = model_with_state(name, NUM_CLASSES, 32, 1, 16, model.state_dict())
        assert rebuilt.model_name == name and str(rebuilt) == str(model)


def test_htfllib_model_groups():
    """HtFLlib's system/main.py: HtFE-img-5's models, and client i of the HtC-img-4 groups gets
    models[i % len(models)] with heads[i % 4], Head(hidden_dims=[512]), [512, 512], [512, 256], [512, 128]."""
    htfe8 = FAMILIES["HtFE8"]
    assert family_models("HtFE-img-5") == ["googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50"]
    for alias, bases in (("HtFE-img-8-HtC-img-4", htfe8), ("Res34-HtC-img-4", ["resnet34"])):
        members = family_models(alias)
        assert len(members) == (8 if len(bases) == 8 else 4)
        for client in range(20):
            assert split_model_name(members[client % len(members)]) == (bases[client % len(bases)],
                                                                        HTC4[client % 4])
    hidden = [head_widths(HEADS[name](512, 10)) for name in HTC4]
    assert hidden == [[(512, 10)], [(512, 512), (512, 10)], [(512, 256), (256, 10)], [(512, 128), (128, 10)]]
    assert [type(m) for m in HEADS["mlp256"](512, 10)] == [nn.Linear, nn.ReLU, nn.Linear]
    assert family_models("Res34-HtC4") == ["resnet34", "resnet34+mlp512", "resnet34+mlp256", "resnet34+mlp128"]


def test_with_heads_cycles_through_both_lists():
    assert with_heads(["tiny_cnn", "cnn4"], ["mlp512", "linear", "mlp128"]) == [
        "tiny_cnn+mlp512", "cnn4", "tiny_cnn+mlp128", "cnn4+mlp512", "tiny_cnn", "cnn4+mlp128"]


def test_a_model_with_its_own_head_has_one_name_and_one_initialization():
    torch.manual_seed(0)
    plain = build_model("tiny_cnn", NUM_CLASSES)
    torch.manual_seed(0)
    named = build_model("tiny_cnn+linear", NUM_CLASSES)
    assert named.model_name == plain.model_name == "tiny_cnn"
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), named.state_dict().values()))
    assert build_model("vit_b_16+linear", NUM_CLASSES, feature_dim=16).model_name == "vit_b_16+linear"
    assert family_models("tiny_cnn+mlp128") == ["tiny_cnn+mlp128"]


@pytest.mark.parametrize("name,fragment", [("tiny_cnn+wide", "unknown head 'wide' in model 'tiny_cnn+wide'"),
                                           ("resnet5+mlp128", "unknown model 'resnet5+mlp128'")])
def test_unknown_head_or_base_is_rejected(name, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        build_model(name, NUM_CLASSES)
    with pytest.raises(ValueError, match="unknown model family"):
        family_models(name)
