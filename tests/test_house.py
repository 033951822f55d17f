"""The house's rules: imports point down (flcore never imports the harness, no baseline imports FedKTL, dataset/
imports nothing of system/), no argparse namespace inside flcore, settings are frozen and resolved once, and an
algorithm written in a test file registers itself and runs end to end with nothing edited elsewhere."""
import ast
import os
import re
import subprocess
import sys
from dataclasses import FrozenInstanceError, dataclass, fields, is_dataclass

import pytest
import torch

from flcore import algorithms
from flcore.clients.clientbase import Client
from flcore.errors import UserError
from flcore.exchange import Payload
from flcore.paths import REPO_ROOT
from flcore.servers.serverbase import Server
from flcore.settings import RunSettings, Settings, option, raise_first_failed
from flutils import experiment
from flutils.options import build_parser, parse_args
from flutils.results import read_h5

FLCORE = os.path.join(REPO_ROOT, "system", "flcore")
FEDKTL_MODULES = {"flcore.servers.serverktl", "flcore.servers.serverktl_stylegan_3",
                  "flcore.servers.serverktl_stylegan_xl", "flcore.servers.serverktl_stable_diffusion",
                  "flcore.clients.clientktl", "flcore.ktl_ops"}
SYSTEM_PACKAGES = {"flcore", "flutils", "flower_app"}


def python_files(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(root, name)


def imported_modules(path):
    """Every module an import statement of the file names (relative imports resolved to their package)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path):
    return "flcore." + os.path.relpath(path, FLCORE)[:-3].replace(os.sep, ".").removesuffix(".__init__")


def test_flcore_imports_nothing_of_the_harness():
    offenders = {module_name(path): sorted(m for m in imported_modules(path) if m.split(".")[0] == "flutils")
                 for path in python_files(FLCORE)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_flcore_loads_without_the_harness_in_a_fresh_interpreter(tmp_path):
    code = ("import sys, flcore.algorithms, flcore.runner, flcore.parallel; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flutils', 'flower_app')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_baseline_imports_fedktl():
    offenders = {}
    for path in python_files(FLCORE):
        name = module_name(path)
        if name in FEDKTL_MODULES or name == "flcore.algorithms":
            continue
        wrong = sorted(m for m in imported_modules(path)
                       if any(m == k or m.startswith(k + ".") for k in FEDKTL_MODULES))
        if wrong:
            offenders[name] = wrong
    assert offenders == {}


def test_dataset_imports_nothing_of_system():
    offenders = {}
    for path in python_files(os.path.join(REPO_ROOT, "dataset")):
        wrong = sorted(m for m in imported_modules(path) if m.split(".")[0] in SYSTEM_PACKAGES)
        if wrong:
            offenders[os.path.relpath(path, REPO_ROOT)] = wrong
    assert offenders == {}


def test_flcore_reads_no_argparse_namespace_and_imports_no_module_by_name():
    """No `args` (an argparse namespace) is read in flcore, and our own modules are imported by import statements,
    so the import graph is the real one."""
    found = []
    for path in python_files(FLCORE):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                found.append(f"{module_name(path)}:{node.lineno} args.{node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "args" and isinstance(node.value, ast.Name) \
                    and node.value.id == "self":
                found.append(f"{module_name(path)}:{node.lineno} self.args")
            if isinstance(node, ast.Attribute) and node.attr == "import_module":
                found.append(f"{module_name(path)}:{node.lineno} import_module")
    assert found == []


def test_every_algorithms_settings_are_frozen_typed_and_resolved_with_their_own_defaults(small_run):
    for server_cls in algorithms.server_classes():
        settings_cls = server_cls.Settings
        assert is_dataclass(settings_cls) and issubclass(settings_cls, Settings), server_cls.__name__
        for f in fields(settings_cls):
            assert "flags" in f.metadata, f"{settings_cls.__name__}.{f.name} is not a flag"
    config = parse_args(small_run("-algo", "FedProto"))
    with pytest.raises(FrozenInstanceError):
        config.algo.lamda = 1.0
    with pytest.raises(FrozenInstanceError):
        config.run.global_rounds = 3
    # One flag, two algorithms, each its own default when the flag is absent; a given 0 is a value.
    assert parse_args(small_run("-algo", "FedProto")).algo.lamda == 10.0
    assert parse_args(small_run("-algo", "FedDistill")).algo.lamda == 1.0
    assert parse_args(small_run("-algo", "FedProto", "-lam", "0")).algo.lamda == 0.0
    assert parse_args(small_run("-algo", "FedKTL-stylegan-3")).algo.mu == 50.0
    assert parse_args(small_run("-algo", "FedKTL-stable-diffusion")).algo.mu == 100.0


def test_a_flag_of_another_algorithm_is_parsed_but_not_part_of_this_algorithms_settings(small_run):
    config = parse_args(small_run("-algo", "Local", "-al", "2"))
    assert "alpha" not in config.values()
    with pytest.raises(UserError, match="-al must be in"):
        parse_args(small_run("-algo", "FML", "-al", "2"))


@dataclass(frozen=True)
class ToySettings(Settings):
    title = "Toy (a test's algorithm)"
    toy_shift: float = option(0.5, "--toy_shift", help="added to the server's running mean each round")

    def validate(self):
        raise_first_failed([(self.toy_shift >= 0, f"--toy_shift must be >= 0, got {self.toy_shift}")])


class ClientToy(Client):
    """Uploads its mean training label; holds the server's last number."""

    def receive(self, payload):
        self.from_server = float(payload.tensors["mean"])

    def upload(self):
        return Payload({"mean": self.train_y.float().mean().reshape(1)})


class ServerToy(Server):
    Settings = ToySettings

    def prepare(self):
        self.mean = torch.zeros(1)

    @classmethod
    def new_client(cls, setup, spec):
        return ClientToy(setup)

    def payload_for(self, client_id):
        return Payload({"mean": self.mean})

    def aggregate(self, uploads, timer):
        if uploads:
            self.mean = torch.cat([u.tensors["mean"] for u in uploads.values()]).mean().reshape(1) \
                + self.settings.toy_shift
        self.round_metrics = {"toy_mean": float(self.mean)}
        return {}

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"]


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setattr(algorithms, "ALGORITHMS", dict(algorithms.ALGORITHMS))
    algorithms.register("Toy", ServerToy)


def test_an_algorithm_registered_from_a_test_file_runs_end_to_end(toy_registered, small_run, tmp_path, capsys,
                                                                   one_torch_thread):
    assert re.search(r"\nToy \(a test's algorithm\):\n\s+--toy_shift", build_parser().format_help())
    assert experiment.main(small_run("-algo", "Toy", "-gr", "2", "--toy_shift", "1")) == 0
    result = read_h5(str(tmp_path / "results" / "Digits_Toy_test_0.h5"))
    assert result["upload_floats"].tolist() == [4, 4]  # one float from each of 4 clients
    assert result["download_floats"].tolist() == [4, 4]
    assert len(result["rs_test_acc"]) == 3 and (result["toy_mean"] >= 1).all()

    capsys.readouterr()
    assert experiment.main(small_run("-algo", "Toy", "--toy_shift", "-1")) == 2
    assert capsys.readouterr().err.strip() == "error: --toy_shift must be >= 0, got -1.0"


def test_a_taken_algorithm_name_is_refused(toy_registered):
    with pytest.raises(ValueError, match="taken"):
        algorithms.register("Toy", ServerLocalLike)


class ServerLocalLike(Server):
    pass


def test_run_settings_hold_every_general_flag_and_nothing_of_an_algorithm():
    names = {f.name for f in fields(RunSettings)}
    assert {"global_rounds", "num_clients", "join_ratio", "client_drop_rate", "image_every", "seed"} <= names
    assert not names & {"lamda", "mu", "server_learning_rate", "server_epochs", "alpha"}
