"""Checkpoints and --resume: for every algorithm, a run killed after a round and resumed equals the uninterrupted
run; other flags are refused; a checkpoint write is atomic; a finished run extends to more rounds."""
import numpy as np
import pytest
import torch

from flcore.algorithms import ALGORITHMS
from flcore.runner import Runner
from flutils import experiment

# Evaluating every other round (-eg 2) halves the evaluations, the bulk of a small run's time, and puts the
# evaluation schedule across the kill in the test: rounds 0 and 2 only.
ROUNDS, EVAL_GAP, KILLED_AFTER = 2, 2, 1
KTL_SERVER = ["-se", "3", "-sbs", "8", "--image_every", "0"]
# Each algorithm's own flags at small sizes; an algorithm missing here runs with its defaults.
SMALL_FLAGS = {
    "FedKTL-stylegan-3": KTL_SERVER,  # the pre-trained face DCGAN: Gaussian latents
    "FedKTL-stylegan-xl": [*KTL_SERVER, "-gen", "untrained"],  # the built-in generator: class-conditional W latents
    "FedKTL-stable-diffusion": [*KTL_SERVER, "--sd_steps", "2"],
    "FedGen": ["-se", "5", "-nd", "16", "-hd", "16"],
    "FedGH": ["-se", "3"],
    "FedTGP": ["-se", "3"],
    "FedMRL": ["-sfd", "16"],  # d1 at most the tests' -fd 64
    "FedFTG": ["-m", "tiny_cnn", "--ftg_iterations", "2", "--ftg_batch_size", "8", "--ftg_generator_width", "8"],
    # Fine-tuning on the synthetic set after the FedAvg rounds puts that set into the checkpoint.
    "FGL": ["-m", "tiny_cnn", "--sd_steps", "2", "--fgl_images_per_class", "3", "--fgl_server_epochs", "1",
            "--fgl_finetune_epochs", "1", "-gbs", "3"],
}
WALL_CLOCK = "round_time"


def one_name_per_server():
    """Aliases (FD, LG) run the same server as their full names, so each server is resumed once."""
    names = {}
    for name, server in ALGORITHMS.items():
        names.setdefault(server, name)
    return list(names.values())


class Killed(Exception):
    pass


def without_wall_clock(state):
    """A server's state_dict() without what a second run cannot reproduce: its round and phase timings."""
    values = {key: v for key, v in state["history"]["values"].items() if key != WALL_CLOCK}
    return {**state, "history": values}


@pytest.mark.parametrize("algorithm", one_name_per_server())
def test_a_run_killed_after_a_round_and_resumed_equals_an_uninterrupted_run(small_run, server_from_argv, tmp_path,
                                                                           monkeypatch, request, algorithm,
                                                                           assert_same_state):
    flags = SMALL_FLAGS.get(algorithm, [])
    if algorithm in ("FedKTL-stable-diffusion", "FGL"):
        flags = [*flags, "-GPath", request.getfixturevalue("tiny_sd_pipeline")]

    def argv(name, *extra):
        # Three clients train per round (-jr) and one upload of three arrives (-cdr): the random draws and the clients
        # left behind are state the first resumed round depends on (FedKD sends them its last compressed update).
        return small_run("-algo", algorithm, "-gr", str(ROUNDS), "-eg", str(EVAL_GAP), "-jr", "0.75", "-cdr", "0.5",
                         "--shots", "20", *flags, "-sfn", str(tmp_path / name), *extra)

    uninterrupted = server_from_argv(argv("uninterrupted"))
    uninterrupted.train()

    save_checkpoint = Runner.save_checkpoint

    def save_then_die(server):
        save_checkpoint(server)
        if server.round == KILLED_AFTER:
            raise Killed

    monkeypatch.setattr(Runner, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        server_from_argv(argv("killed")).train()
    monkeypatch.undo()

    # A fresh server, as the next process builds it: only the checkpoint carries the run over.
    resumed = server_from_argv(argv("killed", "--resume"))
    assert resumed.resume() and resumed.round == KILLED_AFTER
    resumed.train()
    # Accuracy curves, losses, communication and algorithm metrics; every model, optimizer, server state and
    # random generator after the last round.
    assert_same_state(without_wall_clock(resumed.state_dict()), without_wall_clock(uninterrupted.state_dict()),
                      algorithm)
    assert resumed.history.values["eval_rounds"] == [0, ROUNDS]


def ktl_argv(small_run, checkpoints, rounds, *extra):
    return small_run("-algo", "FedKTL-stylegan-3", "-gr", str(rounds), "--shots", "20", *KTL_SERVER,
                     "-sfn", str(checkpoints), *extra)


def test_resume_refuses_other_flags(small_run, tmp_path, error_line):
    argv = ktl_argv(small_run, tmp_path / "ck", 1)
    assert experiment.main(argv) == 0
    assert "local_learning_rate" in error_line(experiment.main, argv + ["--resume", "-lr", "0.5"])


def test_checkpoint_write_is_atomic(make_server, tmp_path, monkeypatch):
    server = make_server("FedKTL-stylegan-3", *KTL_SERVER, "-sfn", str(tmp_path / "ck"))
    server.save_checkpoint()
    path = server.checkpoint_path()
    before = open(path, "rb").read()

    def interrupted_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    server.round = 1
    with pytest.raises(KeyboardInterrupt):
        server.save_checkpoint()
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    fresh = make_server("FedKTL-stylegan-3", *KTL_SERVER, "-sfn", str(tmp_path / "ck"), "--resume")
    assert fresh.resume() and fresh.round == 0


@pytest.mark.parametrize("eval_gap", ["1", "2"])
def test_a_finished_run_extended_with_more_rounds_equals_a_longer_run(small_run, tmp_path, results_of, eval_gap):
    longer = ktl_argv(small_run, tmp_path / "ck_longer", 3, "-eg", eval_gap)
    assert experiment.main(longer) == 0

    short = ktl_argv(small_run, tmp_path / "ck", 1, "-eg", eval_gap)
    short[short.index("--results_dir") + 1] = str(tmp_path / "extended")
    assert experiment.main(short) == 0
    extended = list(short)
    extended[extended.index("-gr") + 1] = "3"
    assert experiment.main(extended + ["--resume"]) == 0
    expected, resumed = results_of(longer), results_of(extended)
    for key in expected.keys() - {"attrs", WALL_CLOCK}:
        if not key.startswith("time_"):  # per-phase wall-clock seconds
            np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)
