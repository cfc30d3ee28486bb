"""The ClientApp's work: decode a training message, run the method's trainer, build the reply;
and tell the server this node's partition id when it asks (to sample partitions)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedhpro_flwr.algorithms.models import place
from fedhpro_flwr.algorithms.privacy import ClientPrivacy
from fedhpro_flwr.app.kept import NodeKeptModel
from fedhpro_flwr.app.sharing import NodeMemory, claim_node_state, client_seed, sharing_for
from fedhpro_flwr.config import EXPERIMENT_ID_KEY, STRATEGY_KEY, ConfigError, ExperimentConfig
from fedhpro_flwr.data.federated import DataSpec, TensorData, cached_client_data, local_data
from fedhpro_flwr.methods import ClientTask, get_method
from fedhpro_flwr.methods.payload import (
    EXPERIMENT_RECORD,
    RecordKeys,
    required_record,
    tensors_to_record,
)
from fedhpro_flwr.methods.sampling import NUM_PARTITIONS_KEY, PARTITION_KEY, QUERY_RECORD


def pick_device(node_config: dict[str, Any]) -> torch.device:
    """`device` from the node config, else the GPU when one is visible."""
    name = node_config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(name))


def node_partition(node_config: dict[str, Any], num_partitions: int) -> int:
    """This node's partition id, checked against the experiment's number of partitions (a
    node with its own `data-dir` needs only the id: it names the client in seeds and logs)."""
    if "data-dir" in node_config:
        try:
            partition_id = int(node_config["partition-id"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError("a node with 'data-dir' still needs an integer 'partition-id' "
                              f"(its client id; got {dict(node_config)})") from None
        if partition_id < 0:
            raise ConfigError(f"node config 'partition-id' = {partition_id}: must be >= 0")
        return partition_id
    try:
        partition_id = int(node_config["partition-id"])
        federation = int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            "node config needs integer 'partition-id' and 'num-partitions' "
            f"(got {dict(node_config)})"
        ) from exc
    if federation != num_partitions:
        raise ConfigError(
            f"this federation has num-partitions={federation} (one per SuperNode) but the "
            f"experiment splits the data into partition.num_partitions={num_partitions}; "
            f"start {num_partitions} SuperNodes (simulation: flwr run . --federation-config "
            f"'num-supernodes={num_partitions}') or change the experiment"
        )
    return partition_id


def node_data(node_config: dict[str, Any], cfg: ExperimentConfig, spec: DataSpec,
              partition_id: int) -> TensorData:
    """The node's own `data-dir`, used whole, else its partition of the experiment's data
    (cached on the node's disk after the first round)."""
    if "data-dir" in node_config:
        return local_data(spec, cfg.data, Path(str(node_config["data-dir"])).expanduser())
    return cached_client_data(cfg, partition_id)


# what a benchmark makes of a node's training data before it trains (an attack: flipped
# labels), given the data and the node's partition id
DataView = Callable[[TensorData, int], TensorData]


def handle_train(msg: Message, context: Context, data_view: DataView | None = None) -> Message:
    """One round of local training for whichever method the server runs."""
    keys = RecordKeys.of(msg.content)
    config: ConfigRecord = msg.content.config_records[keys.config]
    method = get_method(str(config[STRATEGY_KEY]))
    cfg = ExperimentConfig.from_flat(msg.content.config_records[EXPERIMENT_RECORD],
                                     {method.name: method.section})
    spec = DataSpec.from_config(config)
    server_round = int(config["server-round"])
    node_config = dict(context.node_config)
    partition_id = node_partition(node_config, cfg.partition.num_partitions)
    device = pick_device(node_config)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    mode = sharing_for(cfg, method)
    memory = NodeMemory(context.state, str(config[EXPERIMENT_ID_KEY]), server_round)
    claim_node_state(memory.state, memory.experiment_id)
    generator = torch.Generator().manual_seed(client_seed(cfg.seed, server_round, partition_id))
    data = node_data(node_config, cfg, spec, partition_id)
    if data_view is not None:
        data = data_view(data, partition_id)
    local = mode.client_model(spec, data,
                              required_record(msg.content, keys.arrays), partition_id, node_config,
                              memory)
    place(local.model, device)

    privacy = ClientPrivacy.of(cfg.privacy, generator)
    started, start = time.time(), time.perf_counter()  # wall clock, for the server's timeline
    extra, train_metrics = method.client_train(
        ClientTask(local.model, local.data, msg.content, cfg, device, generator,
                   NodeKeptModel(cfg, memory, partition_id), privacy)
    )
    if privacy is not None:
        train_metrics = privacy.reply_metrics(train_metrics)
    seconds = time.perf_counter() - start

    weights, own_metrics = mode.finish(local, partition_id, memory, device)
    metrics = MetricRecord({
        keys.examples: len(local.data),
        "partition-id": partition_id,
        "client-seconds": seconds,
        "client-started": started,
        **train_metrics,
        **own_metrics,
    })
    reply = RecordDict({keys.arrays: tensors_to_record(weights), keys.metrics: metrics, **extra})
    return Message(content=reply, reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """This node's partition id, for the server to sample partitions by the seed; checked
    as a training round checks it, so a misconfigured node is named before it is sampled."""
    query = msg.content.config_records[QUERY_RECORD]
    partition_id = node_partition(dict(context.node_config), int(query[NUM_PARTITIONS_KEY]))
    reply = RecordDict({QUERY_RECORD: ConfigRecord({PARTITION_KEY: partition_id})})
    return Message(content=reply, reply_to=msg)
