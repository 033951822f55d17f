"""The ServerApp: the algorithm's own server (flcore/servers) runs its round loop unchanged; only its clients'
turns travel, as Flower messages to the nodes that serve their partitions. Results are written as main.py
writes them, so results_table.py reads both."""
import sys
import time
from dataclasses import MISSING, fields

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from tqdm import tqdm

from flcore.errors import UserError
from flcore.load_cache import LoadCache
from flower_app.records import engine_settings, read_reply, request_content
from flutils.data import load_federated_dataset
from flutils.experiment import resolve_device, start_run, summarize_runs, train_and_write
from flutils.tracking import check_logger

app = ServerApp()


def ask_partitions(grid, node_ids, timeout, strict):
    """{partition: node id} of the nodes that answer which partition they serve; with `strict`, a node's error or
    two nodes of one partition stop the run (at start-up), else they are skipped (a node rejoining mid-run)."""
    questions = [Message(RecordDict({"question": ConfigRecord({"ask": "partition"})}), dst_node_id=node,
                         message_type="query") for node in node_ids]
    nodes = {}
    for answer in grid.send_and_receive(questions, timeout=timeout):
        node = answer.metadata.src_node_id
        if answer.has_error():
            if strict:
                raise UserError(f"node {node}: {answer.error.reason.strip().splitlines()[-1]}")
            continue
        partition = int(answer.content["answer"]["partition"])
        if strict and partition in nodes:
            raise UserError(f"nodes {nodes[partition]} and {node} both serve partition {partition}; give each "
                            f"node its own partition-id")
        nodes[partition] = node
    return nodes


def discover_nodes(grid, num_clients, wait_seconds):
    """{client id: node id}: waits for the nodes, then asks each which partition it serves."""
    deadline = time.monotonic() + wait_seconds
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < num_clients:
        if time.monotonic() > deadline:
            raise UserError(f"only {len(node_ids)} of {num_clients} nodes connected within {wait_seconds:.0f} s; "
                            f"start one SuperNode per partition (or raise node-wait in the run config)")
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    nodes = ask_partitions(grid, node_ids, wait_seconds, strict=True)
    missing = sorted(set(range(num_clients)) - set(nodes))
    if missing:
        raise UserError(f"no node serves partitions {missing}; start their SuperNodes")
    return nodes


class FlowerClients:
    """The engine that runs a run's clients on Flower nodes (the Runner's engine, as LocalClients). The server
    sends each client the spec on first contact, and with every turn the number of turns it completed, so a node
    goes back to the state a resumed server expects. A turn that fails or times out is sent once more if its
    client's SuperNode comes back (under a new node id) within `rejoin_wait` seconds: the node reads the state the turn expects, so the retried
    turn computes what the lost one would have. Otherwise the client misses the round (as with -cdr) and the
    runner has the algorithm forget what it believed the client holds."""

    def __init__(self, grid, nodes, run, timeout, rejoin_wait):
        self.grid = grid
        self.nodes = nodes
        self.run = run
        self.timeout = timeout
        self.rejoin_wait = rejoin_wait
        self.plan = None
        self.turns_done = {}
        self.has_spec = set()

    def rejoined(self, clients):
        """Of `clients`, those whose partition a newly connected node serves (waiting up to rejoin_wait seconds
        for all of them)."""
        deadline = time.monotonic() + self.rejoin_wait
        moved = set()
        while True:
            known = set(self.nodes.values())
            new = [node for node in self.grid.get_node_ids() if node not in known]
            if new:
                for partition, node in ask_partitions(self.grid, new, self.timeout, strict=False).items():
                    tqdm.write(f"client {partition} is now served by node {node}")
                    self.nodes[partition] = node
                    moved.add(partition)
            if set(clients) <= moved or time.monotonic() >= deadline:
                return [client_id for client_id in clients if client_id in moved]
            time.sleep(0.5)

    def start(self, plan):
        """The nodes build their clients themselves, from the plan's spec sent with each client's first turn."""
        self.plan = plan

    def run_turns(self, requests):
        """The replies of the turns that completed (the runner lets the others miss the round)."""
        replies, failed = self.send_turns(requests)
        if failed:
            retry = self.rejoined(failed)
            if retry:
                replies.update(self.send_turns({client_id: requests[client_id] for client_id in retry})[0])
        return {client_id: replies[client_id] for client_id in requests if client_id in replies}

    def send_turns(self, requests):
        """One message per turn to the client's node; (the replies of the turns that completed, the clients whose
        turn failed or timed out)."""
        messages = []
        for client_id, request in requests.items():
            spec = None if client_id in self.has_spec else self.plan.spec
            content = request_content(request, self.run, client_id, self.turns_done.get(client_id, 0), spec,
                                      client_id in self.plan.slow_train)
            messages.append(Message(content, dst_node_id=self.nodes[client_id],
                                    message_type="train" if request.train else "evaluate"))
        sent = list(zip(requests, messages))
        round_index = next(iter(requests.values())).round
        replies, lost = {}, set()
        answers = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        # Sending gave each message its id; a reply (or the error in its place) names the message it answers.
        client_of = {message.metadata.message_id: client_id for client_id, message in sent}
        for message in answers:
            client_id = client_of.get(message.metadata.reply_to_message_id)
            if client_id is None:  # an error that names no message (a node gone): its turn counts as failed
                tqdm.write(f"round {round_index}: {message.error.reason if message.has_error() else 'a reply'}"
                           f" for no turn of this round")
                continue
            if message.has_error():
                reason = message.error.reason.strip().splitlines()
                tqdm.write(f"round {round_index}: client {client_id}'s turn failed "
                           f"({reason[-1] if reason else 'no reason'})")
                continue
            if message.content["reply"]["lost"]:
                tqdm.write(f"round {round_index}: client {client_id}'s node lost its state; it starts over")
                self.turns_done[client_id] = 0
                self.has_spec.discard(client_id)
                lost.add(client_id)
                continue
            replies[client_id] = read_reply(message.content)
            self.turns_done[client_id] = self.turns_done.get(client_id, 0) + 1
            self.has_spec.add(client_id)
        return replies, [client_id for client_id in requests if client_id not in replies and client_id not in lost]

    def state_dict(self):
        return {"turns_done": dict(self.turns_done)}

    def load_state_dict(self, state):
        self.turns_done = dict(state["turns_done"])

    def checkpoint_written(self):
        """The nodes keep their own states."""

    def close(self):
        """The nodes outlive the run."""


def differences_from_main(config):
    """'name value (main.py: default)' for each setting of the run that main.py without flags would set otherwise:
    the app's own defaults are sized for a quick check (2 rounds, a small feature dimension, CPU)."""
    changed = []
    for settings in (config.run, config.algo):
        for f in fields(settings):
            value = getattr(settings, f.name)
            if f.default is not MISSING and value != f.default:
                changed.append(f"{f.name} {value!r} (main.py: {f.default!r})")
    return changed


def run_on_flower(grid, run_config):
    config, settings = engine_settings(run_config)
    args = config.run
    check_logger(args.logger)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    dataset = load_federated_dataset(args, only=[])
    nodes = discover_nodes(grid, args.num_clients, settings["node-wait"])
    print(f"{args.algorithm} on Flower: {args.num_clients} nodes, {args.global_rounds} rounds")
    changed = differences_from_main(config)
    if changed:
        print(f"settings unlike main.py's defaults (the app's run config in system/flower/pyproject.toml, or "
              f"--run-config): {', '.join(changed)}")
    device = resolve_device(args)
    histories = []
    cache = LoadCache()
    for run in range(args.prev, args.times):
        clients = FlowerClients(grid, nodes, run, settings["turn-timeout"], settings["rejoin-wait"])
        runner, tracker = start_run(config, run, dataset, device, cache, clients)
        try:
            histories.append(train_and_write(config, run, runner))
        finally:
            tracker.close()
    return summarize_runs(args, histories)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_on_flower(grid, context.run_config)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
