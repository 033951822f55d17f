"""The exchange contract (flcore/exchange.py) as Flower records: payloads, turn requests and replies, main.py flags
from a run config, and a client's state in a node's RecordDict or on its disk."""
import json
import os
from dataclasses import fields

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flcore.client_store import decode, encode, read_state_file, write_state_file
from flcore.errors import UserError
from flcore.exchange import Payload, TurnReply, TurnRequest
from flutils.options import build_parser, parse_args


def put_payload(content, name, payload):
    """A payload as three records of `content`: tensors (ArrayRecord), config, metrics."""
    content[f"{name}.tensors"] = ArrayRecord({key: t.detach().cpu().contiguous() for key, t in payload.tensors.items()})
    content[f"{name}.config"] = ConfigRecord(dict(payload.config))
    content[f"{name}.metrics"] = MetricRecord(dict(payload.metrics))


def get_payload(content, name):
    tensors = content[f"{name}.tensors"]
    return Payload(dict(tensors.to_torch_state_dict()) if len(tensors) else {},
                   dict(content[f"{name}.config"]), dict(content[f"{name}.metrics"]))


def request_content(request, run, client_id, previous_turns, spec=None, train_slow=False):
    """What a node gets for one turn: the request, which client it is, how many turns that client completed
    (so a node whose state is ahead, after the server resumed from a checkpoint, goes back to it) and, on first
    contact, the spec its client is built from."""
    content = RecordDict()
    content["turn"] = ConfigRecord({
        "round": request.round, "evaluate": request.evaluate, "train": request.train,
        "payloads": len(request.payloads), "run": run, "client": client_id, "previous_turns": previous_turns,
        "has_spec": spec is not None, "train_slow": train_slow})
    for i, payload in enumerate(request.payloads):
        put_payload(content, f"payload.{i}", payload)
    if spec is not None:
        put_payload(content, "spec", spec)
    return content


def read_request(content):
    turn = content["turn"]
    payloads = [get_payload(content, f"payload.{i}") for i in range(int(turn["payloads"]))]
    spec = get_payload(content, "spec") if turn["has_spec"] else None
    return TurnRequest(int(turn["round"]), payloads, bool(turn["evaluate"]), bool(turn["train"])), turn, spec


# TurnReply's number fields travel in the reply's ConfigRecord under their own names.
REPLY_NUMBERS = {f.name: f.type for f in fields(TurnReply) if f.type in (int, float)}


def reply_content(reply):
    content = RecordDict()
    stats = list(reply.stats) if reply.stats is not None else []
    content["reply"] = ConfigRecord({"lost": False, "has_stats": reply.stats is not None,
                                     "stats": [float(v) for v in stats], "has_upload": reply.upload is not None,
                                     **{name: getattr(reply, name) for name in REPLY_NUMBERS}})
    content["seconds"] = MetricRecord(dict(reply.seconds))
    if reply.upload is not None:
        put_payload(content, "upload", reply.upload)
    return content


def lost_state_content():
    """The reply of a node that holds no state for the turn the server asked (it restarted without its disk)."""
    content = RecordDict()
    content["reply"] = ConfigRecord({"lost": True})
    return content


def read_reply(content):
    record = content["reply"]
    stats = None
    if record["has_stats"]:
        correct, samples, auc, test_loss, train_loss = record["stats"]
        stats = (int(correct), int(samples), auc, test_loss, train_loss)
    upload = get_payload(content, "upload") if record["has_upload"] else None
    return TurnReply(stats=stats, upload=upload, seconds=dict(content["seconds"]),
                     **{name: kind(record[name]) for name, kind in REPLY_NUMBERS.items()})


def flag_actions():
    """main.py's flags by destination name (the run config's keys), with their argparse actions."""
    return {action.dest: action for action in build_parser()._actions if action.option_strings}


def args_from_run_config(run_config):
    """main.py's flags from a Flower run config whose keys are the flags' long names (dashes or underscores):
    the same names, parsed and checked by the same parser."""
    actions = flag_actions()
    argv = []
    for key, value in run_config.items():
        if value == "":  # main.py's default (a folder under the repository)
            continue
        dest = key.replace("-", "_")
        if dest not in actions or dest == "help":
            raise UserError(f"unknown flag '{key}' in the run config; use the long names that `python system/main.py "
                            f"-h` lists (e.g. algorithm, global_rounds)")
        action = actions[dest]
        option = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:
            if value:
                argv.append(option)
            continue
        argv += [option, str(int(value) if isinstance(value, bool) else value)]
    try:
        return parse_args(argv)
    except SystemExit:
        raise UserError(f"the run config does not parse as main.py flags: {' '.join(argv)}") from None


# Run-config keys of the Flower engine itself (seconds); every other key is a main.py flag.
ENGINE_DEFAULTS = {"turn-timeout": 600.0, "node-wait": 120.0, "rejoin-wait": 60.0}


def engine_settings(run_config):
    """(main.py's Config from the run config, the engine's own settings)."""
    settings = {key: float(run_config.get(key, default)) for key, default in ENGINE_DEFAULTS.items()}
    flags = {key: value for key, value in run_config.items() if key not in ENGINE_DEFAULTS}
    return args_from_run_config(flags), settings


def partition_of(node_config, num_clients):
    """The client (dataset partition) a node serves, from its node config's partition-id."""
    if "partition-id" not in node_config:
        raise UserError("this node has no partition-id; start it with --node-config \"partition-id=<i> "
                        "num-partitions=<n>\" (the simulation engine sets it)")
    partition = int(node_config["partition-id"])
    if not 0 <= partition < num_clients:
        raise UserError(f"partition-id {partition} is out of range for -nc {num_clients}; give each node one of "
                        f"0..{num_clients - 1}")
    return partition


class NodeState:
    """A client's state between its turns on one node, tagged with the number of turns it completed: in the
    node's RecordDict (the simulation engine keeps it in memory), or as files in `folder` (deployment; written
    to a temporary name and renamed). On disk the last three tags are kept, so a server that resumes from a
    checkpoint finds the state its checkpoint expects (a node may be two turns ahead of it: an evaluation and a
    training turn of the round that was cut); in memory the last two (a reply lost on its way back)."""

    def __init__(self, records, folder=None, scope=""):
        self.records = records
        self.folder = folder
        self.scope = scope  # names in the RecordDict are per run
        self.keep = 3 if folder else 2
        if folder:
            os.makedirs(folder, exist_ok=True)

    def path(self, name, turns):
        return os.path.join(self.folder, f"{name}_{turns:06d}.safetensors")

    def tags(self, name):
        if self.folder:
            prefix = f"{name}_"
            return sorted(int(f[len(prefix):-len(".safetensors")]) for f in os.listdir(self.folder)
                          if f.startswith(prefix) and f.endswith(".safetensors"))
        prefix = f"{self.scope}{name}:"
        return sorted(int(key[len(prefix):]) for key in self.records
                      if key.startswith(prefix) and not key.endswith(".skeleton"))

    def save(self, name, turns, value):
        if self.folder:
            write_state_file(self.path(name, turns), value)
        else:
            tensors = {}
            skeleton = json.dumps(encode(value, tensors, "s"))
            self.records[f"{self.scope}{name}:{turns}"] = ArrayRecord(tensors) if tensors else ArrayRecord()
            self.records[f"{self.scope}{name}:{turns}.skeleton"] = ConfigRecord({"state": skeleton})
        for old in self.tags(name)[:-self.keep]:
            self.remove(name, old)

    def remove(self, name, turns):
        if self.folder:
            os.remove(self.path(name, turns))
        else:
            del self.records[f"{self.scope}{name}:{turns}"], self.records[f"{self.scope}{name}:{turns}.skeleton"]

    def load(self, name, turns):
        """The value saved under `turns`, or None."""
        if turns not in self.tags(name):
            return None
        if self.folder:
            return read_state_file(self.path(name, turns))[0]
        record = self.records[f"{self.scope}{name}:{turns}"]
        tensors = dict(record.to_torch_state_dict()) if len(record) else {}
        return decode(json.loads(self.records[f"{self.scope}{name}:{turns}.skeleton"]["state"]), tensors)
