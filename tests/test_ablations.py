"""FedKTL's ablation switches each change the computation they name; the cloud-edge (K-shot) setting;
the results table."""
import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flcore.ktl_ops import etf_cosines
from fldata.cli import run as run_generation
from fldata.sources import DIGITS
from flutils import experiment, results_table
from flutils.data import load_federated_dataset
from flutils.options import parse_args

FAST_SERVER = ["-se", "5", "-sbs", "8"]
# make_server's algorithm and flags: a short domain alignment and no image grids.
FAST_KTL = ["FedKTL-stylegan-3", *FAST_SERVER, "--image_every", "0"]


def model_states(server):
    return [{k: v.clone() for k, v in c.model.state_dict().items()} for c in server.clients]


def same_states(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def train_rounds(server, rounds):
    server.settings = dataclasses.replace(server.settings, global_rounds=rounds)
    server.train()


def test_mu_zero_gives_the_same_models_as_no_generated_data(make_server, monkeypatch):
    with_pairs = make_server(*FAST_KTL, "-mu", "0")
    without_pairs = make_server(*FAST_KTL, "-mu", "0")
    monkeypatch.setattr(without_pairs.algorithm, "payload_for", lambda client_id: None)
    train_rounds(with_pairs, 2)
    train_rounds(without_pairs, 2)
    assert with_pairs.clients[0].pair_latents is not None and without_pairs.clients[0].pair_latents is None
    assert same_states(model_states(with_pairs), model_states(without_pairs))

    transfer = make_server(*FAST_KTL, "-mu", "50")
    train_rounds(transfer, 2)
    assert not same_states(model_states(transfer), model_states(with_pairs)), "mu > 0 must change the models"


def test_etf_off_uses_a_plain_linear_head(make_server, fixed_batch):
    client = make_server(*FAST_KTL, "-etf", "0").clients[0]
    client.model.eval()
    x, y = fixed_batch(client)
    assert client.etf is None
    assert torch.equal(client.scores(x), client.model(x))
    assert client.training_loss(x, y).item() == pytest.approx(F.cross_entropy(client.model(x), y).item(), rel=1e-6)


def test_margin_zero_is_plain_scaled_cosine_softmax(make_server, fixed_batch):
    server = make_server(*FAST_KTL, "-margin", "0")
    server.send(server.clients)  # the margin comes with each round's payload
    client = server.clients[0]
    client.model.eval()
    x, y = fixed_batch(client)
    cosines = etf_cosines(client.model(x), client.etf)
    assert client.training_loss(x, y).item() == pytest.approx(F.cross_entropy(64 * cosines, y).item(), rel=1e-6)
    server = make_server(*FAST_KTL)
    server.send(server.clients)
    with_margin = server.clients[0]
    assert with_margin.training_loss(x, y).item() > client.training_loss(x, y).item()


def test_feature_transformer_off_stays_fixed(make_server, round_timer):
    server = make_server(*FAST_KTL, "-ft", "0")
    before = {k: v.clone() for k, v in server.algorithm.transformer.state_dict().items()}
    assert not any(p.requires_grad for p in server.algorithm.transformer.parameters())
    server.exchange(server.clients, round_timer(server))
    assert all(torch.equal(before[k], v) for k, v in server.algorithm.transformer.state_dict().items())

    trained = make_server(*FAST_KTL)
    before = {k: v.clone() for k, v in trained.algorithm.transformer.state_dict().items()}
    trained.exchange(trained.clients, round_timer(trained))
    assert not all(torch.equal(before[k], v) for k, v in trained.algorithm.transformer.state_dict().items())


def test_mmd_off(make_server, round_timer):
    server = make_server(*FAST_KTL, "-mmd", "0")
    server.exchange(server.clients, round_timer(server))
    assert server.algorithm.round_metrics["align_mmd"] == 0.0
    server = make_server(*FAST_KTL)
    server.exchange(server.clients, round_timer(server))
    assert server.algorithm.round_metrics["align_mmd"] > 0.0


def class_means(server):
    uploads = [c.prototypes() for c in server.clients]
    prototypes = torch.cat([p for p, _ in uploads])
    labels = torch.cat([c for _, c in uploads])
    with torch.no_grad():
        mapped = server.algorithm.transformer(prototypes)
    return {int(c): mapped[labels == c].mean(0) for c in torch.unique(labels)}


@pytest.mark.parametrize("reset", ["1", "0"])
def test_centroid_reset(make_server, round_timer, reset):
    server = make_server(*FAST_KTL, "-cr", reset)
    server.exchange(server.clients, round_timer(server))
    means = class_means(server)
    renderable = server.algorithm.image_generator.renderable  # the face DCGAN's: class means moved to the typical norm
    matches = [torch.allclose(server.algorithm.centroids[c], renderable(m[None])[0], atol=1e-5)
               for c, m in means.items()]
    assert all(matches) if reset == "1" else not any(matches)


def test_reset_proj_sends_proj_every_round(make_server, round_timer):
    server = make_server(*FAST_KTL, "-rp", "1")
    server.exchange(server.clients, round_timer(server))
    server.send(server.clients)
    client = server.clients[0]
    with torch.no_grad():
        client.proj.weight.add_(1.0)
    server.download_floats = 0
    server.send(server.clients)
    latent = server.algorithm.image_generator.latent_dim
    per_client = 10 * 3 * 32 * 32 + 10 * latent + 64 * latent + latent
    assert server.download_floats == 4 * per_client
    assert torch.equal(client.proj.weight, server.algorithm.proj.weight)


def test_shots_keep_k_samples_per_class(small_run):
    full = load_federated_dataset(parse_args(small_run()).run)
    few = load_federated_dataset(parse_args(small_run("--shots", "2")).run)
    for a, b in zip(full.clients, few.clients):
        full_counts = torch.bincount(a.train_y, minlength=10)
        few_counts = torch.bincount(b.train_y, minlength=10)
        assert torch.equal(few_counts, full_counts.clamp(max=2))
        assert torch.equal(b.test_y, a.test_y), "the test split is untouched"


def test_cloud_edge_single_client_k_shot(tmp_path, results_of):
    root = tmp_path / "data"
    assert run_generation(DIGITS, ["--num-clients", "1", "--partition", "iid", "--out", str(root / "Digits")]) == 0
    argv = ["-data", "Digits", "-nb", "10", "-nc", "1", "-m", "cnn4", "-dev", "cpu", "-fd", "64", "--shots", "5",
            "-algo", "FedKTL-stylegan-3", "-gr", "2", *FAST_SERVER, "--dataset_dir", str(root),
            "--results_dir", str(tmp_path / "results")]
    assert experiment.main(argv) == 0
    data = results_of(argv)
    assert np.all(data["upload_floats"] == 10 * 10), "one client uploads a K-dim prototype for each of 10 classes"
    assert len(data["rs_test_acc"]) == 3 and data["rs_test_acc"].max() > 0.1


def test_results_table_summarizes_runs(small_run, results_dir, results_of, capsys):
    argv = small_run("-algo", "Local", "-gr", "1", "-t", "2", "-go", "table")
    assert experiment.main(argv) == 0
    results = results_dir(argv)
    capsys.readouterr()
    out_file = os.path.join(results, "table.md")
    assert results_table.main(["--dataset", "Digits", "--goal", "table", "--results_dir", results,
                               "--out", out_file]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| Local ")][0]
    best = [results_of(argv, run)["rs_test_acc"].max() * 100 for run in range(2)]
    assert f"{np.mean(best):.2f} +- {np.std(best):.2f} | 2 | 0.0000 | 0.0000 |" in row
    assert open(out_file).read().strip().endswith(row)
    assert results_table.main(["--dataset", "Nope", "--results_dir", results]) == 2


def test_results_table_scores_early_rounds_and_several_goals(small_run, capsys):
    for goal, rounds in (("short", "2"), ("long", "3")):
        assert experiment.main(small_run("-algo", "Local", "-gr", rounds, "-go", goal)) == 0
    results = small_run()[small_run().index("--results_dir") + 1]
    capsys.readouterr()
    assert results_table.main(["--dataset", "Digits", "--goal", "short", "long", "--rounds", "1",
                               "--results_dir", results, "--metrics", "upload_floats", "nonexistent"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| Local")}
    assert set(rows) == {"Local [short]", "Local [long]"}
    for goal in ("short", "long"):
        data = results_table.read_h5(os.path.join(results, f"Digits_Local_{goal}_0.h5"))
        early = data["rs_test_acc"][data["eval_rounds"] <= 1].max() * 100
        assert f"| {early:.2f} +- 0.00 | 1 |" in rows[f"Local [{goal}]"]
        assert rows[f"Local [{goal}]"].endswith("| 0.000 | nan |"), "last upload of Local: 0; unknown: nan"
    # Same seed and flags: the first rounds of both runs are the same computation.
    assert rows["Local [short]"].split("|")[2] == rows["Local [long]"].split("|")[2]


def test_results_table_metric_specs_pick_a_round_or_the_mean():
    data = {"grad_cosine": np.array([np.nan, 0.2, -0.4, 0.8])}
    assert results_table.metric_value(data, "grad_cosine") == pytest.approx(0.8)
    assert results_table.metric_value(data, "grad_cosine@2") == pytest.approx(-0.4)
    assert results_table.metric_value(data, "grad_cosine@mean") == pytest.approx(0.2)
    assert np.isnan(results_table.metric_value(data, "grad_cosine@9"))
    assert results_table.metric_header("grad_cosine@mean") == "grad_cosine (mean over rounds)"
    with pytest.raises(SystemExit):
        results_table.main(["--metrics", "grad_cosine@late"])


def test_results_table_tail_column_averages_the_last_evaluations(capsys):
    data = {"rs_test_acc": np.array([0.1, 0.5, 0.9, 0.7, 0.6]), "eval_rounds": np.arange(5),
            "upload_floats": np.zeros(4), "download_floats": np.zeros(4), "round_time": np.ones(4)}
    assert results_table.tail_accuracy(data, 3) == pytest.approx((0.9 + 0.7 + 0.6) / 3)
    assert results_table.tail_accuracy(data, 2, rounds=2) == pytest.approx((0.5 + 0.9) / 2)
    row = results_table.table({"Local": [data]}, tail=3).splitlines()[2]
    assert row.startswith("| Local | 90.00 +- 0.00 | 73.33 +- 0.00 | 1 |")
    assert results_table.main(["--tail", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --tail must be >= 0, got -1"
