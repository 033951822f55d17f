"""The speed options on a GPU (marked `cuda`: `pytest -m cuda`; skipped without CUDA; benchmarks/gpu_check.sh runs
them): fp16 with its grad scaler trains and a resumed run equals the uninterrupted one; bf16 stays within the
tolerance README states; --offload leaves no client state on the GPU between turns; the clients' data lives on the
GPU; a generator pickle loaded on the CPU renders on CUDA; running out of GPU memory is one error line that names
the flags that make the run fit."""
import math

import numpy as np
import pytest
import torch

from flcore.generators.stylegan import StyleGANLatents
from flcore.runner import Runner
from flutils import experiment
from flutils.data import load_federated_dataset
from flutils.options import parse_args
from flutils.results import read_h5

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = ["-dev", "cuda", "-did", "0"]
KTL = ["-algo", "FedKTL-stylegan-3", "-se", "3", "-sbs", "8", "--image_every", "0", "--shots", "20"]
CURVES = ("rs_test_acc", "rs_test_auc", "rs_train_loss", "upload_floats", "download_floats")
# The CPU tolerance of bf16 (tests/test_speed_flags.py, README "Speed"), held on the GPU too.
AMP_ACCURACY_POINTS = 0.05
AMP_LOSS_SHARE = 0.05


@pytest.fixture
def deterministic(monkeypatch):
    """cuDNN's and cuBLAS's deterministic kernels, so two runs of the same flags compute the same bits (ops without
    a deterministic kernel only warn)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def curves(argv):
    settings = parse_args(argv).run
    return read_h5(f"{settings.results_dir}/{settings.dataset}_{settings.algorithm}_{settings.goal}_0.h5")


def cuda_runner(argv):
    config = parse_args(argv)
    return Runner(config, load_federated_dataset(config.run), 0, torch.device("cuda", 0))


def test_fp16_with_the_grad_scaler_trains_and_resumes_equal(small_run, tmp_path, deterministic):
    flags = [*KTL, *CUDA, "--amp", "fp16", "-go", "fp16", "--client_state", "memory"]
    whole = small_run(*flags, "-gr", "3")
    assert experiment.main(whole) == 0
    checkpoints = str(tmp_path / "checkpoints")
    killed = small_run(*flags, "-gr", "1", "-sfn", checkpoints, "--results_dir", str(tmp_path / "a"))
    assert experiment.main(killed) == 0
    resumed = small_run(*flags, "-gr", "3", "-sfn", checkpoints, "--resume", "1", "--results_dir", str(tmp_path / "b"))
    assert experiment.main(resumed) == 0
    expected, actual = curves(whole), curves(resumed)
    trained = ~np.isnan(expected["rs_train_loss"])
    assert trained.any() and np.all(np.isfinite(expected["rs_train_loss"][trained]))  # the scaler kept it finite
    for key in CURVES:
        assert np.array_equal(actual[key], expected[key], equal_nan=True), key
    # The scaler's state (its scale after the overflows it met) is checkpointed with each client.
    checkpoint = torch.load(tmp_path / "checkpoints" / "Digits_FedKTL-stylegan-3_fp16_0.pt", weights_only=True)
    scales = [state["scaler"]["scale"] for state in checkpoint["clients"]["states"]]
    assert len(scales) == 4 and all(0 < scale <= 2.0**16 for scale in scales)


def test_bf16_on_the_gpu_stays_within_the_tolerance(small_run):
    full = small_run(*KTL, *CUDA, "-gr", "2", "-go", "fp32")
    mixed = small_run(*KTL, *CUDA, "-gr", "2", "-go", "bf16", "--amp", "bf16")
    assert experiment.main(full) == 0 and experiment.main(mixed) == 0
    full, mixed = curves(full), curves(mixed)
    assert np.all(np.abs(mixed["rs_test_acc"] - full["rs_test_acc"]) <= AMP_ACCURACY_POINTS)
    trained = ~np.isnan(full["rs_train_loss"])
    assert np.all(np.abs(mixed["rs_train_loss"][trained] / full["rs_train_loss"][trained] - 1) <= AMP_LOSS_SHARE)


def state_tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from state_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from state_tensors(item)


def test_offload_leaves_no_client_state_on_the_gpu_between_turns(small_run):
    runner = cuda_runner(small_run("-algo", "FedProto", *CUDA, "--offload", "1", "--client_state", "memory"))
    try:
        client = runner.clients[0]
        before = torch.cuda.memory_allocated(0)
        with runner.store.loaded(client):
            assert all(p.device.type == "cuda" for p in client.model.parameters())
            client.train()
            assert torch.cuda.memory_allocated(0) > before
        # Optimizer step counts (0-dim) may stay where they are; everything else of the state is home.
        on_gpu = [t.shape for t in state_tensors(client.state_dict()) if t.device.type == "cuda" and t.dim() > 0]
        assert on_gpu == []
        assert all(p.grad is None for p in client.model.parameters())
        assert torch.cuda.memory_allocated(0) <= before + 2**20  # the model, its gradients and activations left
    finally:
        runner.close()


def test_the_clients_data_is_resident_on_the_gpu(small_run):
    runner = cuda_runner(small_run("-algo", "Local", *CUDA))
    try:
        for client in runner.clients:
            assert client.train_x.device.type == "cuda" and client.train_y.device.type == "cuda"
            assert client.test_x.device.type == "cuda"
            assert client.test_y.device == torch.device("cpu")  # the scores are ranked on the CPU
    finally:
        runner.close()


def test_a_generator_pickle_loaded_on_the_cpu_renders_on_cuda(small_run, tmp_path):
    from compact_stylegan import CompactGenerator
    from generator_io import load_generator_pickle, save_generator_pickle

    torch.manual_seed(0)
    path = str(tmp_path / "xl_shaped.pkl")
    save_generator_pickle(CompactGenerator(c_dim=1000, img_resolution=32), path)
    G = load_generator_pickle(path, device="cpu")
    on_cpu = StyleGANLatents(G, torch.device("cpu"))
    latents = on_cpu.sample_valid(4, torch.Generator().manual_seed(1))
    expected = on_cpu.render(latents)
    on_cuda = StyleGANLatents(G, torch.device("cuda", 0))
    images = on_cuda.render(latents.to("cuda"))
    assert images.device.type == "cuda" and images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(images.cpu(), expected, atol=1e-3, rtol=1e-3)
    argv = small_run("-algo", "FedKTL-stylegan-xl", *CUDA, "-gr", "1", "-se", "2", "-sbs", "8", "--image_every", "0",
                     "--shots", "10", "-gen", "stylegan-xl", "-GPath", path)
    assert experiment.main(argv) == 0
    assert math.isfinite(float(curves(argv)["rs_test_acc"][-1]))


def test_out_of_memory_is_one_line_naming_the_fixes(small_run, capsys):
    """A real CUDA out-of-memory: the allocator is capped at 1 MiB, so the first client's data does not fit."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(2**20 / total, 0)
    try:
        capsys.readouterr()
        assert experiment.main(small_run("-algo", "Local", *CUDA, "-gr", "1")) == 2
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert all(fix in errors[0] for fix in ("--offload", "-gbs", "--client_state disk"))
