"""The house's contracts: the recipes of docs/architecture.md for a new algorithm and a new generator work as
written, every generator adapter satisfies the GeneratorAdapter Protocol, each algorithm's flags are declared by its
own server, the shared helpers (per-class means, LoadCache) behave, and imports need no sys.path edits."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from flcore import algorithms
from flcore.errors import UserError
from flcore.generators import registry as generator_registry
from flcore.generators.base import GeneratorAdapter
from flcore.generators.dcgan import DCGANGenerator, GaussianLatents
from flcore.generators.stylegan import StyleGANLatents
from flcore.load_cache import LoadCache
from flcore.paths import REPO_ROOT
from flcore.per_class import add_per_class, per_class_means
from flcore.servers.serverbase import Server
from flcore.settings import RunSettings, own_fields
from flutils import experiment
from flutils.options import build_parser, parse_args, settings_classes
from flutils.results import read_h5

ARCHITECTURE = os.path.join(REPO_ROOT, "docs", "architecture.md")


def recipe_python_block(after_heading):
    """The first ```python block of docs/architecture.md that follows the bold paragraph heading `after_heading`."""
    with open(ARCHITECTURE) as f:
        text = f.read()
    start = text.index(after_heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    return match.group(1)


@pytest.fixture
def registry(monkeypatch):
    """The algorithm registry as it is; what a test registers is gone after it."""
    monkeypatch.setattr(algorithms, "ALGORITHMS", dict(algorithms.ALGORITHMS))


def test_new_algorithm_recipe_runs_resumes_and_lists_its_flag(registry, small_run, tmp_path, capsys,
                                                                       one_torch_thread):
    namespace = {"__name__": "recipe_servermine"}
    exec(compile(recipe_python_block("**Adding an algorithm.**"), "architecture-algorithm", "exec"), namespace)
    assert algorithms.server_class("Mine") is namespace["ServerMine"]

    help_text = build_parser().format_help()
    assert re.search(r"\nMine:\n\s+--mine_weight", help_text)
    assert parse_args(small_run("-algo", "Mine", "--mine_weight", "2")).algo.mine_weight == 2.0

    whole = small_run("-algo", "Mine", "-gr", "3", "-go", "whole", "-sfn", str(tmp_path / "ckpt_whole"))
    assert experiment.main(whole) == 0
    results = tmp_path / "results"
    reference = read_h5(str(results / "Digits_Mine_whole_0.h5"))
    # Counted by the loop from the payloads: 4 heads of 64 x 10 + 10 up every round, down once there is one.
    assert reference["upload_floats"].tolist() == [4 * 650] * 3
    assert reference["download_floats"].tolist() == [0, 4 * 650, 4 * 650]
    assert len(reference["rs_test_acc"]) == 4

    # Interrupted after round 1, then resumed: the same curve as the uninterrupted run.
    split = small_run("-algo", "Mine", "-go", "split", "-sfn", str(tmp_path / "ckpt_split"))
    assert experiment.main([*split, "-gr", "1"]) == 0
    assert experiment.main([*split, "-gr", "3", "--resume"]) == 0
    resumed = read_h5(str(results / "Digits_Mine_split_0.h5"))
    assert resumed["rs_test_acc"].tolist() == reference["rs_test_acc"].tolist()


class TinyGAN(nn.Module):
    z_dim = 8

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(self.z_dim, 3 * 16 * 16), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, 3, 16, 16)


def test_new_generator_recipe_runs(monkeypatch, small_run, capsys, one_torch_thread):
    monkeypatch.setattr(generator_registry, "GENERATORS", dict(generator_registry.GENERATORS))
    namespace = {"load_my_gan": lambda path: TinyGAN()}
    exec(compile(recipe_python_block("**Adding a generator.**"), "architecture-generator", "exec"), namespace)
    adapter = namespace["MyGANLatents"](TinyGAN(), torch.device("cpu"))
    assert isinstance(adapter, GeneratorAdapter)

    assert experiment.main(small_run("-algo", "FedKTL-stylegan-3", "-gen", "mygan", "-GPath", "my_gan.pt", "-gr",
                                     "2", "-se", "2", "--image_every", "0")) == 0
    assert "FedKTL: lambda 0.1, mu 50.0, server lr 0.01, latent dim 8" in capsys.readouterr().out


def test_every_builtin_adapter_satisfies_the_protocol():
    from compact_stylegan import build_default_generator

    cpu = torch.device("cpu")
    adapters = [StyleGANLatents(build_default_generator(16, 3), cpu),
                GaussianLatents(DCGANGenerator(z_dim=8, widths=(16, 8)), cpu)]
    for adapter in adapters:
        assert isinstance(adapter, GeneratorAdapter), type(adapter).__name__
        latents = adapter.sample_valid(3, torch.Generator().manual_seed(0))
        assert latents.shape == (3, adapter.latent_dim)
        images = adapter.render(adapter.renderable(latents))
        assert images.dim() == 4 and images.shape[0] == 3 and torch.isfinite(images).all()
    assert not isinstance(object(), GeneratorAdapter)


def test_each_flag_is_declared_by_its_owners_settings_and_shown_in_its_algorithms_group():
    owners = {}
    for klass in settings_classes():
        for f in own_fields(klass):
            for flag in f.metadata["flags"]:
                owners.setdefault(flag, []).append(klass)
    owner_of = {flag: klasses[0] for flag, klasses in owners.items() if len(klasses) == 1}
    server = algorithms.server_class
    assert owner_of["--alpha"] is server("FML").Settings and owner_of["--mentee_model"] is server("FedKD").Settings
    for algorithm in ("FedKTL-stable-diffusion", "FGL"):  # the Stable Diffusion flags: one class both extend
        assert issubclass(server(algorithm).Settings, owner_of["--sd_steps"])
    for flag in ("--kt_norm", "--generator"):  # FedKTL's loop's own: every FedKTL-* settings class extends its owner
        assert issubclass(server("FedKTL-stylegan-3").Settings, owner_of[flag])
        assert issubclass(server("FedKTL-stable-diffusion").Settings, owner_of[flag])
    assert owner_of["--global_rounds"] is RunSettings
    # -lam is the algorithms' own flag, declared (with the same names) by each that reads it, not a general one.
    assert RunSettings not in owners["--lamda"] and len(owners["--lamda"]) >= 3
    help_text = build_parser().format_help()
    for group in ("FML:", "FedGen:", "FedKD:", "FedTGP:", "Stable Diffusion (FedKTL-stable-diffusion, FGL):",
                  "FedKTL (every generator):"):
        assert f"\n{group}\n" in help_text, group


def test_an_algorithms_flag_checks_run_only_for_that_algorithm(small_run):
    with pytest.raises(UserError, match="-al must be in"):
        parse_args(small_run("-algo", "FML", "-al", "2"))
    assert "alpha" not in parse_args(small_run("-algo", "Local", "-al", "2")).values()
    with pytest.raises(UserError, match="--sd_steps must be >= 1"):
        parse_args(small_run("-algo", "FedKTL-stable-diffusion", "--sd_steps", "0"))


@pytest.mark.parametrize("algorithm,flag,value,message", [
    ("FedKTL-stylegan-3", "-lam", "-1", "-lam must be >= 0"),
    ("FedKTL-stylegan-3", "-mu", "-0.5", "-mu must be >= 0"),
    ("FedKTL-stylegan-3", "-slr", "0", "-slr must be > 0"),
    ("FedDistill", "-lam", "-1", "-lam must be >= 0"),
    ("FedProto", "-lam", "-2", "-lam must be >= 0"),
    ("FedGH", "-slr", "-1", "-slr must be > 0"),
])
def test_weights_are_validated_by_every_algorithm(small_run, tmp_path, capsys, algorithm, flag, value, message):
    argv = small_run("-algo", algorithm, flag, value, "-gr", "1", "-gen", "untrained")
    assert experiment.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "results").exists()


def test_an_algorithms_default_applies_only_when_the_flag_is_absent(small_run):
    assert parse_args(small_run("-algo", "FedProto")).algo.lamda == 10.0
    assert parse_args(small_run("-algo", "FedProto", "-lam", "0")).algo.lamda == 0.0  # 0 is a value, not "absent"
    with pytest.raises(UserError, match="-slr must be > 0, got 0"):
        parse_args(small_run("-algo", "FedGH", "-slr", "0"))


def test_per_class_means_accumulate_in_batches_like_one_pass():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 4, generator=gen)
    labels = torch.randint(0, 5, (50,), generator=gen)
    labels[labels == 3] = 2  # class 3 is absent
    means, counts = per_class_means(rows, labels, 5)
    for c in range(5):
        chosen = rows[labels == c]
        assert counts[c] == len(chosen)
        assert torch.allclose(means[c], chosen.mean(0) if len(chosen) else torch.zeros(4), atol=1e-6)
    sums, batched_counts = torch.zeros(5, 4), torch.zeros(5)
    for start in range(0, 50, 16):
        add_per_class(sums, batched_counts, rows[start:start + 16], labels[start:start + 16])
    assert torch.equal(batched_counts, counts)
    assert torch.allclose(sums / batched_counts.clamp(min=1)[:, None], means, atol=1e-6)

    weights = torch.rand(50, generator=gen)
    weighted, totals = per_class_means(rows, labels, 5, weights=weights)
    expected = (rows[labels == 0] * weights[labels == 0, None]).sum(0) / weights[labels == 0].sum()
    assert torch.allclose(weighted[0], expected, atol=1e-5) and torch.isclose(totals[0], weights[labels == 0].sum())


def test_load_cache_loads_once_per_key_and_keeps_one_entry_per_kind():
    cache, loads = LoadCache(), []

    def load(tag):
        loads.append(tag)
        return object()

    first = cache.get("pipeline", ("a", "cpu"), lambda: load("a"))
    assert cache.get("pipeline", ("a", "cpu"), lambda: load("again")) is first
    second = cache.get("pipeline", ("b", "cpu"), lambda: load("b"))
    assert second is not first and loads == ["a", "b"]
    assert cache.get("pipeline", ("a", "cpu"), lambda: load("a")) is not first  # "a" was dropped for "b"


def test_every_algorithm_builds_its_clients_through_the_one_hook():
    for cls in algorithms.server_classes():
        assert not hasattr(cls, "make_client") and not hasattr(cls, "client_class"), cls.__name__
        assert cls.__name__ == "ServerLocal" or cls.new_client.__func__ is not Server.new_client.__func__, cls.__name__


def test_the_packages_import_without_any_path_setup(tmp_path):
    """A fresh interpreter outside the checkout imports every package: the editable install is enough."""
    code = ("import flcore.servers.serverktl_stylegan_3, flcore.servers.serverktl_stable_diffusion, fldata.cli, "
            "flutils.experiment, sd_pipelines, compact_stylegan, generator_io, "
            "flower_app.server_app, flower_app.client_app; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
