"""A local Flower deployment: one SuperLink and N SuperNodes as separate processes on 127.0.0.1, one run of the
app in system/flower submitted with `flwr run`, then every process shut down. Insecure (no TLS, no node
authentication): a demonstration on one machine only; docs/flower.md says how to deploy for real.

    python system/flower/deploy_local.py [--nodes 3] [--rounds 2] [--algorithm FedKTL-stylegan-3] [--out DIR]
                                         [--kill-node-at-round R [--restart-node]]

--kill-node-at-round R kills SuperNode 1 (its whole process group) when the server starts evaluating round R; the
run goes on without that client (its turns time out after --turn-timeout seconds). With --restart-node the node is
started again, with the same state folder, and its client continues from its saved state.
Results: <out>/results (the same .h5/.json as main.py); logs: <out>/logs. Exits 0 when the run completed.
"""
import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx

from flcore.errors import UserError
from flcore.paths import REPO_ROOT
from fldata.cli import run as generate_dataset
from fldata.sources import DIGITS

APP = os.path.join(REPO_ROOT, "system", "flower")
CONNECTION = "fedktl-local"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_commands():
    missing = [c for c in ("flower-superlink", "flower-supernode", "flwr") if shutil.which(c) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not found; install Flower with: pip install -r requirements.txt")


class Processes:
    """Started processes, each in a session of its own so that stopping one stops everything it started."""

    def __init__(self, logs):
        self.logs = logs
        self.running = {}

    def start(self, name, command, env=None):
        log = open(os.path.join(self.logs, f"{name}.log"), "w")
        self.running[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True)
        log.close()
        return self.running[name]

    def stop(self, name, grace=10.0):
        process = self.running.pop(name)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(grace)
                os.killpg(process.pid, signal.SIGKILL)  # what the leader started may outlive it
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
            return

    def stop_all(self):
        for name in reversed(list(self.running)):
            self.stop(name)


def wait_healthy(port, seconds, superlink_log):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise UserError(f"the SuperLink on 127.0.0.1:{port} did not answer within {seconds:.0f} s; see {superlink_log}")


def write_connection(flwr_home, port):
    """The `flwr` CLI's connection to this SuperLink, in a Flower home of its own (the user's is untouched)."""
    os.makedirs(flwr_home, exist_ok=True)
    with open(os.path.join(flwr_home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "127.0.0.1:{port}"\ninsecure = true\n')


def supernode_command(superlink_port, node_port, partition, nodes, state_dir):
    config = f"partition-id={partition} num-partitions={nodes} state-dir=\"{state_dir}\""
    return ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
            "--port", str(node_port), "--node-config", config]


def run_config(options, results, datasets):
    values = {"algorithm": options.algorithm, "dataset": "Digits", "num_clients": options.nodes,
              "global_rounds": options.rounds, "dataset_dir": datasets, "results_dir": results,
              "goal": "deploy", "turn-timeout": options.turn_timeout, "node-wait": 120.0}
    return " ".join(f"{k}={v}" if isinstance(v, (int, float)) else f'{k}="{v}"' for k, v in values.items())


def deploy(options):
    require_commands()
    out = os.path.abspath(options.out)
    logs, results, datasets = (os.path.join(out, name) for name in ("logs", "results", "datasets"))
    for folder in (logs, results):
        os.makedirs(folder, exist_ok=True)
    dataset = os.path.join(datasets, "Digits")
    if not os.path.isfile(os.path.join(dataset, "config.json")):
        if generate_dataset(DIGITS, ["--num-clients", str(options.nodes), "--out", dataset]) != 0:
            raise UserError(f"could not write the Digits dataset to {dataset}")
    flwr_home = os.path.join(out, "flwr_home")
    superlink_port = free_port()
    write_connection(flwr_home, superlink_port)
    env = dict(os.environ, FLWR_HOME=flwr_home)
    processes = Processes(logs)
    try:
        processes.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                      "--port", str(superlink_port)], env)
        wait_healthy(superlink_port, 60, os.path.join(logs, "superlink.log"))
        node_ports = [free_port() for _ in range(options.nodes)]
        for i in range(options.nodes):
            processes.start(f"supernode_{i}", supernode_command(superlink_port, node_ports[i], i, options.nodes,
                                                                os.path.join(out, "node_state")), env)
        print(f"SuperLink on 127.0.0.1:{superlink_port}, {options.nodes} SuperNodes; logs in {logs}", flush=True)
        submit = ["flwr", "run", APP, CONNECTION, "--stream", "--run-config", run_config(options, results, datasets)]
        flwr_run = subprocess.Popen(submit, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    start_new_session=True)
        processes.running["flwr_run"] = flwr_run
        killed = False
        kill_line = re.compile(rf"round\s+{options.kill_node_at_round} \|") if options.kill_node_at_round else None
        for line in flwr_run.stdout:
            print(line, end="", flush=True)
            if kill_line is not None and not killed and kill_line.search(line):
                processes.stop("supernode_1", grace=2.0)
                killed = True
                print(f"deploy_local: killed SuperNode 1 at round {options.kill_node_at_round}", flush=True)
                if options.restart_node:
                    processes.start("supernode_1", supernode_command(
                        superlink_port, node_ports[1], 1, options.nodes, os.path.join(out, "node_state")), env)
                    print("deploy_local: restarted SuperNode 1 with its state folder", flush=True)
        status = flwr_run.wait()
        processes.running.pop("flwr_run")
        written = [f for f in os.listdir(results) if f.endswith(".h5")]
        if status != 0 or not written:
            raise UserError(f"the run did not complete (flwr run exited {status}, {len(written)} result files); "
                            f"see the logs in {logs}")
        print(f"deploy_local: run complete; results in {results}", flush=True)
    finally:
        processes.stop_all()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--algorithm", default="FedKTL-stylegan-3")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "results", "flower_deploy"))
    parser.add_argument("--turn-timeout", type=float, default=180.0,
                        help="seconds the server waits for a turn before dropping the client from the round")
    parser.add_argument("--kill-node-at-round", type=int, default=0)
    parser.add_argument("--restart-node", action="store_true")
    options = parser.parse_args(argv)
    try:
        if options.nodes < 2:
            raise UserError(f"--nodes must be >= 2, got {options.nodes}")
        deploy(options)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
