"""The ClientApp: one node serves one client (its dataset partition). Each message is one turn of
flcore.exchange.take_turn on the algorithm's own client class, built from the server's spec and the state the
node kept from its previous turn."""
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flcore.algorithms import server_class
from flcore.clients.clientbase import client_setup
from flcore.errors import UserError
from flcore.exchange import Payload, take_turn
from flower_app.records import (
    NodeState,
    engine_settings,
    lost_state_content,
    partition_of,
    read_request,
    reply_content,
)
from flutils.data import load_federated_dataset
from flutils.experiment import resolve_device

app = ClientApp()


@lru_cache(maxsize=8)
def partition_data(run_config_items, partition):
    """One partition's arrays, read once per worker process (a worker may serve several nodes in turn)."""
    config, _ = engine_settings(dict(run_config_items))
    dataset = load_federated_dataset(config.run, only=[partition])
    return dataset.clients[partition], dataset.image_shape


def node_turn(message: Message, context: Context) -> Message:
    args = engine_settings(context.run_config)[0].run
    if args.num_threads:  # as main.py: the thread count changes the order of float sums, hence the results
        torch.set_num_threads(args.num_threads)
    partition = partition_of(context.node_config, args.num_clients)
    request, turn, spec = read_request(message.content)
    if int(turn["client"]) != partition:
        raise UserError(f"a turn of client {turn['client']} reached the node of partition {partition}")
    run = int(turn["run"])
    folder = context.node_config.get("state-dir")
    store = NodeState(context.state, f"{folder}/run_{run}_client_{partition:05d}" if folder else None, f"run{run}")
    if spec is not None:
        store.save("spec", 0, spec.to_dict())
    else:
        saved_spec = store.load("spec", 0)
        if saved_spec is None:
            return Message(lost_state_content(), reply_to=message)
        spec = Payload.from_dict(saved_spec)
    data, image_shape = partition_data(tuple(sorted(context.run_config.items())), partition)
    setup = client_setup(args, data, partition, run, resolve_device(args), image_shape,
                         train_slow=bool(turn["train_slow"]))
    server_cls = server_class(args.algorithm)
    client = server_cls.new_client(setup, spec)
    previous = int(turn["previous_turns"])
    if previous:
        state = store.load("client", previous)
        if state is None:
            return Message(lost_state_content(), reply_to=message)
        client.load_state_dict(state)
    reply = take_turn(client, request, server_cls.upload_phase)
    store.save("client", previous + 1, client.state_dict())
    return Message(reply_content(reply), reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which partition this node serves (checked against the run's -nc)."""
    args = engine_settings(context.run_config)[0].run
    partition = partition_of(context.node_config, args.num_clients)
    return Message(RecordDict({"answer": ConfigRecord({"partition": partition})}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return node_turn(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return node_turn(message, context)
