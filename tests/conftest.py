"""Fixtures shared by the test files; the project's packages come from its editable install (pip install -e .)."""
import math
import os
import signal
import time

import pytest
import torch

from flcore.exchange import PhaseTimer
from flcore.runner import Runner, run_name
from fldata.cli import run as run_generation
from fldata.sources import DIGITS
from flutils.data import load_federated_dataset
from flutils.options import parse_args
from flutils.results import read_h5


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """A 4-client federated Digits dataset (Dirichlet 0.1), made once per test session."""
    root = tmp_path_factory.mktemp("datasets")
    assert run_generation(DIGITS, ["--num-clients", "4", "--out", str(root / "Digits")]) == 0
    return root


@pytest.fixture(scope="session")
def small_argv(digits_root):
    """main.py flags for a small, fast CPU run on the session's Digits dataset, writing into `results_dir`
    (for fixtures that outlive one test; tests use small_run)."""
    def argv(results_dir, *extra, dataset_dir=digits_root):
        return ["-data", "Digits", "-nb", "10", "-nc", "4", "-dev", "cpu", "-m", "HtCPU4", "-fd", "64",
                "--dataset_dir", str(dataset_dir), "--results_dir", str(results_dir), *extra]
    return argv


@pytest.fixture
def small_run(small_argv, digits_root, tmp_path):
    """Builds main.py flags for a small, fast CPU run on the session's Digits dataset, results in tmp_path."""
    def argv(*extra, dataset_dir=digits_root):
        return small_argv(tmp_path / "results", *extra, dataset_dir=dataset_dir)
    return argv


@pytest.fixture(scope="session")
def server_from_argv():
    """The one place tests build a run (a Runner: its algorithm's server and its clients): run 0 of argv's -algo on
    the CPU."""
    def build(argv, cache=None):
        config = parse_args(argv)
        return Runner(config, load_federated_dataset(config.run), 0, torch.device("cpu"), cache)
    return build


@pytest.fixture
def make_server(small_run, server_from_argv):
    """make_server(algorithm, *flags): the Runner of a small_run of `algorithm` with `flags` (its server is
    `.algorithm`)."""
    def build(algorithm, *flags):
        return server_from_argv(small_run("-algo", algorithm, *flags))
    return build


@pytest.fixture(scope="session")
def round_timer():
    """round_timer(runner): the per-phase timer that runner.exchange(arrived, timer) takes."""
    def timer(server):
        return PhaseTimer(server.phases, server.device)
    return timer


@pytest.fixture(scope="session")
def fixed_batch():
    """fixed_batch(client): the client's first 8 training samples, on its device."""
    def batch(client):
        return client.to_device(client.train_x[:8], client.train_y[:8])
    return batch


@pytest.fixture(scope="session")
def results_dir():
    """results_dir(argv): the --results_dir of main.py flags."""
    def folder(argv):
        return argv[argv.index("--results_dir") + 1]
    return folder


@pytest.fixture(scope="session")
def results_of():
    """results_of(argv, run=0): the .h5 that main.py wrote for one run of these flags, as read_h5 reads it."""
    def read(argv, run=0):
        settings = parse_args(argv).run
        return read_h5(os.path.join(settings.results_dir, run_name(settings, run) + ".h5"))
    return read


@pytest.fixture
def error_line(capsys):
    """error_line(main, *arguments): calls a command line's main in-process, checks that it exits with 2 after
    printing exactly one line, `error: ...`, to stderr, and returns that line."""
    def run(main, *arguments):
        capsys.readouterr()
        assert main(*arguments) == 2
        stderr = capsys.readouterr().err
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        return lines[0]
    return run


@pytest.fixture(scope="session")
def assert_same_state():
    """assert_same_state(actual, expected, where="state"): tensors bit for bit and of the same dtype, dicts with
    the same keys in the same order, lists and tuples of the same type and length, entry by entry, anything else
    equal (NaN equals NaN)."""
    def same(actual, expected, where="state"):
        if isinstance(expected, torch.Tensor):
            assert actual.dtype == expected.dtype and torch.equal(actual.cpu(), expected.cpu()), where
        elif isinstance(expected, dict):
            assert list(actual) == list(expected), where
            for key in expected:
                same(actual[key], expected[key], f"{where}[{key!r}]")
        elif isinstance(expected, (list, tuple)):
            assert type(actual) is type(expected) and len(actual) == len(expected), where
            for i, (a, e) in enumerate(zip(actual, expected)):
                same(a, e, f"{where}[{i}]")
        elif isinstance(expected, float) and math.isnan(expected):
            assert math.isnan(actual), where
        else:
            assert actual == expected, where
    return same


@pytest.fixture(scope="session")
def failing_from_call():
    """failing_from_call(function, n, error): `function` that raises `error` from its n-th call on (a disk that
    fills up, a process killed mid-write); the earlier calls go through."""
    def wrap(function, n, error):
        calls = []

        def failing(*args, **kwargs):
            calls.append(args)
            if len(calls) >= n:
                raise error
            return function(*args, **kwargs)
        return failing
    return wrap


@pytest.fixture(scope="session")
def file_bytes():
    """file_bytes(folder): {relative path: bytes} of every file under `folder`."""
    def contents(folder):
        found = {}
        for parent, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(parent, name)
                with open(path, "rb") as file:
                    found[os.path.relpath(path, folder)] = file.read()
        return found
    return contents


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tmp_path_factory):
    """The folder of a random-weight, Stable-Diffusion-shaped diffusers pipeline (sd_pipelines/tiny.py: 8x VAE
    down-scaling, 4 latent channels, CLIP text encoder, UNet sample size 8: 64x64 images; Euler's init_noise_sigma
    is far from 1, so a missing or doubled scale shows), to load through -GPath like real weights. The character
    vocabulary it was made with (vocab.json, merges.txt) lies in the folder above it."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from sd_pipelines.tiny import write_character_tokenizer, write_tiny_pipeline

    folder = str(tmp_path_factory.mktemp("tiny_sd"))
    write_character_tokenizer(folder)
    return write_tiny_pipeline(os.path.join(folder, "pipeline"), max_tokens=16)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test runs torch on one thread: batches of a few small images gain nothing from a second one, and on a
    busy machine its OpenMP thread spin-waits (test_models.py took 19 s with one thread, 90-200 s with two, on a
    loaded 2-core box). Restored after the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def processes_mentioning(text):
    """Ids of this machine's processes (not this one) whose command line contains `text`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def stop_processes_mentioning(text, wait_seconds=10.0):
    """Ends the processes whose command line contains `text`; returns their ids."""
    pids = processes_mentioning(text)
    stop_processes(pids, wait_seconds)
    return pids


def stop_processes(pids, wait_seconds=10.0):
    """SIGTERM, then SIGKILL for those still alive after `wait_seconds`."""
    def alive():
        return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_seconds
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive():
            return


@pytest.fixture(scope="session", autouse=True)
def flower_home(tmp_path_factory):
    """Flower's home folder (FLWR_HOME: its CLI config, the local SuperLink's database, installed apps) in a
    temporary folder for the whole session, so the suite never writes ~/.flwr. `flwr run` starts a local SuperLink
    and SuperExec that outlive it, and they name their Flower home on their command lines: a test that runs Flower
    stops them, and the session fails here if a Flower process that names one of the session's temporary folders
    is still running at its end (stopped now)."""
    home = str(tmp_path_factory.mktemp("flwr_home"))
    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = home
    yield home
    if before is None:
        os.environ.pop("FLWR_HOME", None)
    else:
        os.environ["FLWR_HOME"] = before
    session_folder = str(tmp_path_factory.getbasetemp())
    left = [pid for pid in processes_mentioning(session_folder) if is_flower_process(pid)]
    stop_processes(left)
    assert not left, f"Flower processes {left} that tests started were still running at the end of the session"


def is_flower_process(pid):
    """Whether process `pid` is one of Flower's (a SuperLink, SuperExec, SuperNode or the flwr CLI)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(name in command for name in ("flower-superlink", "flower-superexec", "flower-supernode", "flwr"))
