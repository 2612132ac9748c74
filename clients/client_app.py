"""The ClientApp: local training on the client's own non-IID shard."""

from __future__ import annotations

from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients import attacks, faults, runtime
from clients.local_update import check_candidates, local_update
from clients.task import TrainTask
from strategies.messages import array_record

app = ClientApp()


def partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Handshake: tell the server which partition this node holds, so that it can map
    node ids to partition ids deterministically."""
    metrics = MetricRecord({
        "partition-id": partition_id(context),
        "num-partitions": int(context.node_config.get("num-partitions", 0)),
    })
    return Message(RecordDict({"metrics": metrics, "placement": ConfigRecord(runtime.placement())}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    task = TrainTask.from_config(msg.content["config"])
    runtime.configure_threads(task.client_cpus)
    global_state = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    pid = partition_id(context)
    seed = task.federation.seed
    faults.maybe_fail(task.client_failure_rate, seed, task.server_round, pid)
    attacks.fail_if_absent(task, pid)
    update = local_update(task, pid, global_state)
    injected = []
    if attacks.is_attacker(task, pid):
        update = attacks.attack_update(update, global_state, task.attack, seed, task.server_round, pid)
        injected.append(f"attack:{task.attack}")
    if task.poison_clients and pid in faults.poisoned_partitions(task.poison_clients, task.federation.clients, seed):
        update.state = faults.poison_state(update.state, task.poison)
        injected.append(f"poison:{task.poison}")
    content = RecordDict({
        "arrays": array_record(update.state),
        "metrics": MetricRecord(update.metrics),
        "placement": ConfigRecord(runtime.placement()),
    })
    if injected:  # recorded by the server in clients.jsonl
        content["faults"] = ConfigRecord({"injected": ",".join(injected)})
    # Fusion's extra records: neuron scores per level, and the class histogram if shared.
    if update.attributions is not None:
        content["attributions"] = array_record(update.attributions)
    if update.class_counts is not None:
        content["class-counts"] = MetricRecord({"counts": update.class_counts})
    return Message(content, reply_to=msg)


@app.evaluate()
def check(msg: Message, context: Context) -> Message:
    """Fusion's model check: the accuracy and loss of each candidate global model (fused,
    averaged) on a sample of this client's shard, so the server sends out the better one,
    the fused one with its logits' temperature fitted to the clients' data."""
    config = msg.content["config"]
    task = TrainTask.from_config(config)
    runtime.configure_threads(task.client_cpus)
    attacks.fail_if_absent(task, partition_id(context))
    candidates = {name: {k: v.numpy() for k, v in record.items()} for name, record in msg.content.array_records.items()}
    metrics = check_candidates(task, partition_id(context), candidates, int(config["check-samples"]),
                               [float(t) for t in config["check-temperatures"]])
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
