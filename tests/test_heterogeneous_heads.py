"""Heterogeneous heads (HtFLlib's HtC-img-4 groups) with every algorithm: each builds and trains clients whose heads
differ, or refuses the family at parse time with one line when it declares that it needs one head (shared_head) or
one model (shared_model); and FedProto/FedTGP's --proto_eval."""
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

from flcore.algorithms import ALGORITHMS, server_classes
from flcore.clients.clientbase import EVAL_BATCH
from flcore.clients.clientproto import nearest_prototype_scores
from flcore.errors import UserError
from flcore.trainmodel import FAMILIES, HTC4, BaseHeadSplit, split_model_name
from flutils import experiment
from flutils.options import parse_args
from flutils.results import read_h5

# The CPU family with HtFLlib's four heads: client i gets HtCPU4[i % 4] with HTC4[i % 4], so the 4 test clients
# hold 4 different bases and 4 different heads.
HEADED = "HtCPU4-HtC4"
KTL_FLAGS = ["-se", "2", "-sbs", "8", "--image_every", "0"]
SMALL_FLAGS = {
    "FedKTL-stylegan-xl": [*KTL_FLAGS, "-gen", "untrained"],
    "FedKTL-stylegan-3": KTL_FLAGS,
    "FedKTL-stable-diffusion": [*KTL_FLAGS, "--sd_steps", "2"],
    "FedGen": ["-se", "2", "-nd", "16", "-hd", "16"],
    "FedTGP": ["-se", "2"],
    "FedMRL": ["-sfd", "16"],
}


def one_name(server_cls):
    return next(name for name, cls in ALGORITHMS.items() if cls is server_cls)


def head_linears(model):
    return [(m.in_features, m.out_features) for m in model.head.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("server_cls", server_classes(), ids=one_name)
def test_every_algorithm_takes_heterogeneous_heads_or_refuses_them_at_parse_time(
        server_cls, small_run, server_from_argv, error_line, request, tmp_path):
    algorithm = one_name(server_cls)
    flags = SMALL_FLAGS.get(algorithm, [])
    if algorithm in ("FedKTL-stable-diffusion", "FGL"):
        flags = [*flags, "-GPath", request.getfixturevalue("tiny_sd_pipeline")]
    argv = small_run("-algo", algorithm, "-m", HEADED, "-gr", "1", "--shots", "10", *flags)
    if server_cls.shared_model or server_cls.shared_head is not None:
        line = error_line(experiment.main, argv)
        assert f"-m {HEADED}" in line and ("-m HtFE8" in line or "-m <one model name>" in line), line
        assert not os.path.exists(tmp_path / "results"), "refused before anything is written"
        return
    runner = server_from_argv(argv)
    for client in runner.clients:
        base, head = split_model_name(client.model.model_name)
        assert (base, head) == (FAMILIES["HtCPU4"][client.id % 4], HTC4[client.id % 4])
        hidden = [] if head == "linear" else [int(head.removeprefix("mlp"))]
        widths = [64, *hidden, 10]
        assert head_linears(client.model) == list(zip(widths, widths[1:]))
    history = runner.train()
    assert len(history.values["rs_test_acc"]) == 2
    assert all(0 <= acc <= 1 for acc in history.values["rs_test_acc"])


def test_the_declared_needs_of_the_head_sharing_algorithms():
    declared = {one_name(cls): (cls.shared_model, cls.shared_head) for cls in server_classes()}
    assert declared["LG-FedAvg"] == declared["FedGen"] == (False, "same")
    assert declared["FedGH"] == (False, "linear")
    assert declared["FedFTG"] == declared["FGL"] == (True, None)
    assert declared["FedProto"] == declared["FedKD"] == declared["FedKTL-stylegan-3"] == (False, None)


@pytest.mark.parametrize("family,algorithm,accepted", [
    ("HtFE8", "FedGH", True), ("Res34-HtC4", "FedGH", False), ("resnet34+mlp256", "LG", True),
    ("resnet34+mlp256", "FedGH", False), ("HtFE-img-8-HtC-img-4", "FedGen", False), ("HtFE8-HtC4", "FedTGP", True),
])
def test_head_needs_are_checked_by_head_name_without_building(small_run, monkeypatch, family, algorithm, accepted):
    def no_build(*args, **kwargs):
        raise AssertionError("parsing built a model")

    monkeypatch.setattr(BaseHeadSplit, "__init__", no_build)
    argv = small_run("-algo", algorithm, "-m", family)
    if accepted:
        assert parse_args(argv).run.model_family == family
    else:
        with pytest.raises(UserError, match=f"-algo {algorithm} needs .* but -m {re.escape(family)} has heads"):
            parse_args(argv)


def evaluated_accuracy(clients, scores):
    """The pooled test accuracy of `clients` when each predicts the argmax of scores(client, x), batched as the
    clients evaluate."""
    correct = total = 0
    for client in clients:
        client.model.eval()
        with torch.no_grad():
            for start in range(0, len(client.test_y), EVAL_BATCH):
                (x,) = client.to_device(client.test_x[start:start + EVAL_BATCH])
                y = client.test_y[start:start + EVAL_BATCH]
                correct += int((scores(client, x).argmax(1).cpu() == y).sum())
                total += len(y)
    return correct / total


def nearest_by_formula(client, x):
    """Minus the distance to each global prototype; classes without one are never chosen."""
    distances = torch.cdist(client.model.base(x), client.global_prototypes)
    return -distances.masked_fill(~client.present, float("inf"))


@pytest.mark.parametrize("algorithm", ["FedProto", "FedTGP"])
def test_proto_eval_nearest_is_the_default_and_head_scores_are_the_model(small_run, server_from_argv,
                                                                        round_timer, algorithm):
    flags = ["-algo", algorithm, "-m", HEADED, "--shots", "10", *SMALL_FLAGS.get(algorithm, [])]
    assert parse_args(small_run(*flags)).algo.proto_eval == "nearest"
    nearest = server_from_argv(small_run(*flags))
    head = server_from_argv(small_run(*flags, "--proto_eval", "head"))
    for runner in (nearest, head):
        runner.exchange(runner.clients, round_timer(runner))
        runner.send(runner.clients)
    for near, by_head in zip(nearest.clients, head.clients):
        assert near.global_prototypes is not None and by_head.proto_eval == "head"
        by_head.model.eval()
        near.model.eval()
        (x,) = by_head.to_device(by_head.test_x[:16])
        with torch.no_grad():
            assert torch.equal(by_head.scores(x), by_head.model(x))
            assert torch.equal(near.scores(x), nearest_prototype_scores(near.model.base(x), near.global_prototypes,
                                                                        near.present))
            assert torch.equal(near.scores(x).argmax(1), nearest_by_formula(near, x).argmax(1))


@pytest.mark.parametrize("proto_eval", ["nearest", "head"])
def test_a_fedproto_run_reports_the_accuracy_of_its_evaluation_mode(small_run, server_from_argv,
                                                                    proto_eval):
    runner = server_from_argv(small_run("-algo", "FedProto", "-m", HEADED, "-gr", "1", "--shots", "10",
                                        "--proto_eval", proto_eval))
    history = runner.train()
    by = nearest_by_formula if proto_eval == "nearest" else (lambda client, x: client.model(x))
    assert history.values["rs_test_acc"][-1] == evaluated_accuracy(runner.clients, by)


def test_workers_and_the_disk_store_rebuild_heterogeneous_heads_bit_for_bit(small_run, tmp_path):
    """-pc workers and the disk store rebuild each client's model from its name (base+head)."""
    def curves(goal, *extra):
        assert experiment.main(small_run("-algo", "FedProto", "-m", HEADED, "-gr", "2", "--shots", "10",
                                         "--proto_eval", "head", "-go", goal, *extra)) == 0
        return read_h5(str(tmp_path / "results" / f"Digits_FedProto_{goal}_0.h5"))

    sequential = curves("seq")
    parallel = curves("pc", "-pc", "2", "--client_state", "disk")
    for key in ("rs_test_acc", "rs_test_auc", "rs_train_loss", "rs_client_acc", "upload_floats"):
        assert np.array_equal(parallel[key], sequential[key], equal_nan=True), key
