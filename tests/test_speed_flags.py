"""The optional speed flags (docs/speed.md): --amp bf16 runs on the CPU and stays within the stated tolerance of
full precision; --amp fp16 on the CPU is a one-line error; --compile runs; --offload gives the same run bit for
bit (alone and with -pc); the data lives where the client computes; running out of GPU memory is a one-line error
that names the flags that make a run fit. tests/test_cuda.py checks them on a GPU."""
import numpy as np
import pytest
import torch

import flcore.runner as runner
from flcore.client_store import OffloadStore
from flutils import experiment
from flutils.results import read_h5

KTL = ["-algo", "FedKTL-stylegan-3", "-se", "3", "-sbs", "8", "--image_every", "0", "--shots", "20",
       "--num_threads", "1"]
CURVES = ("rs_test_acc", "rs_test_auc", "rs_train_loss", "upload_floats", "download_floats")
# bf16 keeps 8 bits of mantissa: after two rounds of these tiny models the test accuracy stays within 5 points and
# the mean training loss within 5 % of full precision (tested here; docs/speed.md).
AMP_ACCURACY_POINTS = 0.05
AMP_LOSS_SHARE = 0.05


def curves(small_run, goal, *flags):
    argv = small_run(*KTL, "-go", goal, *flags)
    assert experiment.main(argv) == 0
    return read_h5(argv[argv.index("--results_dir") + 1] + f"/Digits_FedKTL-stylegan-3_{goal}_0.h5")


def test_bf16_autocast_runs_on_the_cpu_within_the_tolerance(small_run):
    full = curves(small_run, "fp32", "-gr", "2")
    mixed = curves(small_run, "bf16", "-gr", "2", "--amp", "bf16")
    assert not np.array_equal(mixed["rs_train_loss"], full["rs_train_loss"], equal_nan=True)  # bf16 did run
    assert np.all(np.abs(mixed["rs_test_acc"] - full["rs_test_acc"]) <= AMP_ACCURACY_POINTS)
    trained = ~np.isnan(full["rs_train_loss"])
    assert np.all(np.abs(mixed["rs_train_loss"][trained] / full["rs_train_loss"][trained] - 1) <= AMP_LOSS_SHARE)


def test_fp16_on_the_cpu_is_a_one_line_error(small_run, error_line):
    assert "--amp bf16" in error_line(experiment.main, small_run("--amp", "fp16", "-dev", "cpu"))


def test_a_compiled_run_matches_within_float_reordering(small_run):
    pytest.importorskip("torch._inductor")
    plain = curves(small_run, "eager", "-gr", "1", "-m", "tiny_cnn")
    compiled = curves(small_run, "compiled", "-gr", "1", "-m", "tiny_cnn", "--compile", "1")
    np.testing.assert_allclose(compiled["rs_train_loss"], plain["rs_train_loss"], rtol=1e-3)
    assert np.all(np.abs(compiled["rs_test_acc"] - plain["rs_test_acc"]) <= 0.02)


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_offload_gives_the_same_run(small_run, parallel):
    resident = curves(small_run, f"resident{parallel}", "-gr", "2", "-pc", parallel)
    offloaded = curves(small_run, f"offload{parallel}", "-gr", "2", "-pc", parallel, "--offload", "1")
    for key in CURVES:
        assert np.array_equal(offloaded[key], resident[key], equal_nan=True), key


def test_offload_holds_the_state_at_home_between_turns(make_server):
    server = make_server("FedProto", "--offload", "1", "--client_state", "memory")
    assert isinstance(server.store, OffloadStore)
    client = server.clients[0]
    with server.store.loaded(client):
        assert all(p.device == client.device for p in client.model.parameters())
        client.train()
        assert any(p.grad is not None for p in client.model.parameters())
    assert all(p.device == server.store.home and p.grad is None for p in client.model.parameters())


def test_the_data_lives_where_the_client_computes(make_server):
    client = make_server("Local").clients[0]
    assert client.train_x.device == client.device and client.test_y.device == torch.device("cpu")


def test_channels_last_survives_the_disk_store_and_stays_close(small_run, make_server):
    plain = curves(small_run, "plain", "-gr", "1")
    memory = curves(small_run, "nhwc_memory", "-gr", "1", "--channels_last", "1", "--client_state", "memory")
    disk = curves(small_run, "nhwc_disk", "-gr", "1", "--channels_last", "1", "--client_state", "disk")
    for key in CURVES:
        assert np.array_equal(disk[key], memory[key], equal_nan=True), key
    assert np.all(np.abs(memory["rs_test_acc"] - plain["rs_test_acc"]) <= 0.05)
    server = make_server("Local", "--channels_last", "1", "--client_state", "disk")
    client = server.clients[0]
    with server.store.loaded(client, modify=False):
        weights = [p for p in client.model.parameters() if p.dim() == 4]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    server.store.close()


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_out_of_memory_is_one_line_naming_the_fixes(small_run, monkeypatch, capsys, parallel):
    """A client's turn that runs out of GPU memory (here: a patched turn; with -pc 2 in a forked worker, which
    inherits the patch) stops the run with exit status 2 and one error line, no traceback."""
    def out_of_memory(client, request, upload_phase="train"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity "
                                     "of 139.81 GiB of which 1.00 MiB is free.")
    monkeypatch.setattr(runner, "take_turn", out_of_memory)
    capsys.readouterr()
    assert experiment.main(small_run("-algo", "Local", "-gr", "1", "-pc", parallel, "--num_threads", "1")) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert "tried to allocate 20.00 mib" in errors[0]
    assert all(fix in errors[0] for fix in ("--offload", "-gbs", "--client_state disk"))
