"""What every method's server Strategy shares, on top of Flower's FedAvg.

FedAvg gives the round loop (`Strategy.start`). This layer samples the round's nodes by
partition, reproducibly from the seed (`sampling`), and adds what FedAvg cannot do for methods
with extra payloads: it validates every reply (weights, metrics and the method's own arrays)
and rejects bad ones with the node id logged; it averages the weights; it hands the decoded
replies to the method's `server_step`; it measures the round (payload bytes, client and
server seconds); it evaluates the global model on the server; and it exposes state for
checkpoints.

Flower's own sampling is not used: it draws node ids, random per SuperNode start, with
Python's global `random`. Nor is its aggregation for the weights: it sums every ArrayRecord
of a reply (methods send more than the weights), turns integer buffers into floats and cannot
reject one bad reply. Everything else (messages, the round loop) is Flower's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedhpro_flwr.algorithms.diagnostics import anchor_cosines, relative_change, spread
from fedhpro_flwr.algorithms.models import Backbone
from fedhpro_flwr.algorithms.privacy import (
    RELEASES,
    SAMPLE_RATE,
    SGD_STEPS,
    PrivacyLedger,
    sgd_schedule,
)
from fedhpro_flwr.algorithms.robust import Pooling
from fedhpro_flwr.algorithms.training import domain_accuracies, evaluate
from fedhpro_flwr.config import ConfigError, ExperimentConfig, TrainConfig
from fedhpro_flwr.data.federated import TensorData
from fedhpro_flwr.methods.payload import (
    EXPERIMENT_RECORD,
    FLOWER_KEYS,
    RECORD_KEYS_RECORD,
    NonFinite,
    PayloadError,
    RecordKeys,
    check_state_dict,
    error_reason,
    record_nbytes,
    tensors_to_record,
)
from fedhpro_flwr.methods.sampling import (
    PartitionDirectory,
    sample_partitions,
    sample_size,
    wait_for_nodes,
)

# every reply's metrics hold these, and the strategy's example count (`weighted_by_key`)
REQUIRED_METRICS = ("partition-id", "client-seconds", "train_loss")
# a private reply withholds its training loss and says what it released instead
PRIVATE_METRICS = ("partition-id", "client-seconds", SGD_STEPS, SAMPLE_RATE, RELEASES)


@dataclass(frozen=True)
class ClientReply:
    """A validated training reply."""

    node_id: int
    partition_id: int
    num_examples: int
    weights: dict[str, torch.Tensor]
    metrics: dict[str, float]
    extra: Any  # the method's decoded payload


class TooFewReplies(RuntimeError):
    """A round ended with fewer usable replies than `federation.min_replies`."""

    def __init__(self, round_: int, message: str):
        super().__init__(message)
        self.round = round_


class TrainingDiverged(TooFewReplies):
    """Training from the global model has diverged: every sampled node replied and every reply
    held NaN or Inf, or the server step turned the usable replies into NaN or Inf. A later
    round would start from the same state, so the run ends with the last good round's
    checkpoint. The run's outcome, not a fault of the federation."""


def check_privacy_report(metrics: Mapping[str, float], examples: int,
                         train: TrainConfig) -> None:
    """Refuse a private reply whose DP-SGD report is not what the run's config makes of its
    `examples`: the accountant does not take a client's word for its sampling."""
    rate, steps = sgd_schedule(examples, train.batch_size, train.local_epochs)
    reported = (metrics[SAMPLE_RATE], metrics[SGD_STEPS])
    if not math.isclose(reported[0], rate, rel_tol=1e-9) or reported[1] != steps:
        raise PayloadError(f"DP-SGD report (sample rate, steps) = {reported}, but "
                           f"{examples} examples train at ({rate}, {steps})")
    if metrics[RELEASES] < 0 or metrics[RELEASES] != int(metrics[RELEASES]):
        raise PayloadError(f"metric '{RELEASES}' is not a count of releases: "
                           f"{metrics[RELEASES]}")


def weighted_average(
    states: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of state dicts; integer buffers (BatchNorm counters) stay ints."""
    total = sum(weights)
    out = {}
    for name, ref in states[0].items():
        mean = sum(s[name].double() * (w / total) for s, w in zip(states, weights, strict=True))
        out[name] = mean.to(ref.dtype) if ref.is_floating_point() else mean.round().to(ref.dtype)
    return out


def example_mean(replies: list[ClientReply], counts: list[float], key: str) -> float:
    """A client metric's mean over the replies, weighted by their example counts."""
    return sum(r.metrics[key] * n for r, n in zip(replies, counts, strict=True)) / sum(counts)


def mean_metric(replies: list[ClientReply], key: str) -> float:
    """Plain mean of a client metric over the replies that report it (0 if none do)."""
    values = [r.metrics[key] for r in replies if key in r.metrics]
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class PersonalAccuracy:
    """Personal models (heterogeneous clients), each evaluated on its client's own test split:
    the mean, spread and minimum over clients, and each client's, by partition id."""

    mean: float
    std: float  # population std over clients
    min: float
    loss_mean: float
    val_mean: float | None  # on each client's validation share, with data.validation_fraction
    by_partition: dict[str, float]
    # clients that continued from their own model of an earlier round (0 in round 1; fewer
    # later means nodes restarted and began afresh)
    models_restored: int

    def row(self) -> dict[str, Any]:
        return {"client_accuracy_mean": self.mean, "client_accuracy_std": self.std,
                "client_accuracy_min": self.min, "client_loss_mean": self.loss_mean,
                "client_accuracies": self.by_partition,
                "client_models_restored": self.models_restored,
                **({} if self.val_mean is None else {"client_val_accuracy_mean": self.val_mean})}


def personal_accuracy(replies: list[ClientReply]) -> PersonalAccuracy | None:
    """The clients' own evaluations, if any client made one."""
    found = {r.partition_id: (r.metrics["local_accuracy"], r.metrics.get("local_loss", math.nan))
             for r in replies if 0.0 <= r.metrics.get("local_accuracy", -1.0) <= 1.0}
    if not found:
        return None
    accuracies = [a for a, _ in found.values()]
    losses = [v for _, v in found.values() if math.isfinite(v)]
    stats = spread(accuracies, "client_accuracy")
    val = [r.metrics["local_val_accuracy"] for r in replies if "local_val_accuracy" in r.metrics]
    return PersonalAccuracy(
        stats["client_accuracy_mean"], stats["client_accuracy_std"],
        stats["client_accuracy_min"], sum(losses) / len(losses) if losses else math.nan,
        sum(val) / len(val) if val else None,
        {str(k): a for k, (a, _) in sorted(found.items())},
        sum(1 for r in replies if r.metrics.get("local_model_restored") == 1.0))


@dataclass(frozen=True)
class RoundReport:
    """What a round of training measured: its row of results.json, less the evaluation."""

    train_loss: float  # example-weighted mean over the clients used
    train_ce: float | None  # its cross-entropy part, where every client reports it
    client_seconds: float  # summed over clients
    client_seconds_max: float
    # clients on one clock (simulation, SuperNodes on one machine): wall time of the round
    # during which any client was training
    client_busy_seconds: float
    server_seconds: float
    wall_seconds: float
    bytes_up: int
    bytes_down: int
    participants: list[int]  # partition ids of the replies used
    left_out: list[dict[str, Any]]  # {"node", "reason"} for every sampled node not used
    diagnostics: dict[str, Any]  # the method's server step and the anchors'
    personal: PersonalAccuracy | None  # with personal models only

    def row(self) -> dict[str, Any]:
        return {"train_loss": self.train_loss, "client_seconds": self.client_seconds,
                "client_seconds_max": self.client_seconds_max,
                "client_busy_seconds": self.client_busy_seconds,
                "server_seconds": self.server_seconds, "wall_seconds": self.wall_seconds,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "clients": len(self.participants), "failures": len(self.left_out),
                "participants": self.participants, "left_out": self.left_out,
                **({} if self.train_ce is None else {"train_ce": self.train_ce}),
                **self.diagnostics, **(self.personal.row() if self.personal else {})}


def busy_seconds(spans: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """How much of [start, end] at least one of the (begin, end) spans covers: the part of a
    round during which some client was computing, however many ran side by side."""
    total, covered = 0.0, start
    for begin, finish in sorted(spans):
        begin, finish = max(begin, covered), min(finish, end)
        if finish > begin:
            total += finish - begin
            covered = finish
    return total


def checked_state(
    state: Mapping[str, Any], current: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Copies of the tensors in `state` named like `current`, after checking their shapes."""
    out = {}
    for key, now in current.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or value.shape != now.shape:
            raise ValueError(f"checkpoint's '{key}' is missing or not of shape "
                             f"{tuple(now.shape)}")
        out[key] = value.clone()
    return out


class ExperimentStrategy(FedAvg):
    """FedAvg plus validated extra payloads, accounting and checkpointable state.

    Subclasses override `train_records`, `decode_extra`, `server_step`, `evaluate_model`,
    `state_dict` and `load_state_dict`; with none overridden this is FedAvg (sampling by
    partition).
    """

    # whether the method's uploads beyond the weights are pooled by `federation.aggregation`
    # too (`pooled_classes`); one that does not refuses a robust rule instead of half-applying it
    pools_statistics: ClassVar[bool] = True

    def __init__(self, cfg: ExperimentConfig, reference_state: Mapping[str, torch.Tensor],
                 record_keys: RecordKeys = FLOWER_KEYS):
        fed = cfg.federation
        if fed.aggregation != "mean" and not self.pools_statistics:
            raise ConfigError(
                f"config key 'federation.aggregation' = '{fed.aggregation}': "
                f"{type(self).__name__} pools its class statistics by its own average only; "
                f"the robust rules cover every method's weights and the statistics of "
                f"FedHPro, CReFF, FedProto, FedSA and FedNH so far")
        # how the uploads are pooled: None, each method's own average (`federation.aggregation`)
        self.pooling = Pooling.of(fed.aggregation, fed.trim_fraction)
        super().__init__(
            fraction_train=fed.fraction_train,
            fraction_evaluate=0.0,  # the global model is evaluated on the server
            min_train_nodes=fed.min_train_nodes,
            min_available_nodes=fed.min_train_nodes,
            weighted_by_key=record_keys.examples,
            arrayrecord_key=record_keys.arrays,
            configrecord_key=record_keys.config,
        )
        self.metricrecord_key = record_keys.metrics  # where replies carry their metrics
        self.cfg = cfg
        # each node's partition id, learnt when a round samples fewer than all nodes
        self.directory = PartitionDirectory(cfg.partition.num_partitions, fed.round_timeout)
        self.reference_state = {k: v.detach().cpu() for k, v in reference_state.items()}
        self.round_offset = 0  # rounds already done before this process (resume)
        self.report: RoundReport | None = None  # the last round's
        self._round_start = 0.0
        self._round_started = 0.0  # the same moment on the wall clock the clients stamp
        self._bytes_down = 0
        # this round's training messages; the grid gives each its message id when it sends
        # it, and replies (error replies too) name that id
        self._sent: list[Message] = []
        self._anchors_sent: tuple[torch.Tensor, torch.Tensor] | None = None
        # each client's differential privacy spending, composed; None when privacy is off
        self.ledger = PrivacyLedger(cfg.privacy) if cfg.privacy.enabled else None

    # ---- method hooks -------------------------------------------------------------------
    def train_records(self) -> dict[str, ArrayRecord]:
        """Extra ArrayRecords sent to every client with the weights."""
        return {}

    def decode_extra(self, content: Any) -> Any:
        """Decode and validate the method's own arrays in a reply (raise PayloadError)."""
        return None

    def server_step(
        self, server_round: int, weights: dict[str, torch.Tensor], replies: list[ClientReply]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The method's server computation after weight averaging: (weights, diagnostics)."""
        return weights, {}

    def evaluate_model(
        self, model: Backbone, data: TensorData, device: torch.device
    ) -> dict[str, float]:
        """Evaluate the global model (loaded in `model`); gives at least accuracy and loss,
        and the accuracy per domain for multi-domain data."""
        loss, accuracy = evaluate(model, data, device)
        return {"accuracy": accuracy, "loss": loss, **domain_accuracies(model, data, device)}

    def global_anchors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The class anchors clients are pulled towards, (C, d), and which classes have one
        (C,); None for methods without any. Read by the diagnostics."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Server state beyond the model weights, for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def absolute_round(self, server_round: int) -> int:
        """The run's round number for Flower's count in this process (they differ on resume)."""
        return server_round + self.round_offset

    def sample(self, round_: int, grid: Grid) -> list[int]:
        """The node ids that train in `round_`, sorted by partition when sampled.

        Flower's sample size (`sample_size`) and wait for nodes; when it covers every
        connected node all train and no partition is asked, else the nodes' partitions are
        drawn from (seed, round) by `sample_partitions`.
        """
        connected = len(list(grid.get_node_ids()))
        size = sample_size(connected, self.fraction_train, self.min_train_nodes)
        nodes = wait_for_nodes(grid, max(self.min_available_nodes, size))
        if size >= len(nodes):
            chosen = nodes
        else:
            partition_of = self.directory.partitions(grid, nodes, round_)
            if len(partition_of) < size:
                log(WARNING, "round %d: sampling %d nodes, not %d: only %d of %d connected "
                    "nodes told their partition", round_, len(partition_of), size,
                    len(partition_of), len(nodes))
            node_of = {partition: node for node, partition in partition_of.items()}
            partitions = sample_partitions(self.cfg.seed, round_, node_of, size)
            chosen = [node_of[p] for p in partitions]
            log(INFO, "round %d: sampled partitions %s", round_, partitions)
        log(INFO, "configure_train: Sampled %s nodes (out of %s)", len(chosen), len(nodes))
        return chosen

    # ---- Flower Strategy ----------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_start = time.perf_counter()
        self._round_started = time.time()
        round_ = self.absolute_round(server_round)
        config["server-round"] = round_
        extra = self.train_records()
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config,
                              EXPERIMENT_RECORD: ConfigRecord(self.cfg.to_flat()),
                              RECORD_KEYS_RECORD: self.record_keys.to_record(), **extra})
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                    for node in self.sample(round_, grid)]
        payload = record_nbytes(arrays) + sum(record_nbytes(r) for r in extra.values())
        self._bytes_down = payload * len(messages)
        self._sent = messages
        self._anchors_sent = self.global_anchors()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = self.absolute_round(server_round)
        start, replied = time.perf_counter(), time.time()
        replies = list(replies)
        valid, left_out, non_finite = self._validate(round_, replies)
        needed = self.cfg.federation.min_replies
        if len(valid) < needed:
            diverged = not valid and bool(left_out) and non_finite == set(left_out)
            raise (TrainingDiverged if diverged else TooFewReplies)(
                round_,
                ("training diverged: every reply is non-finite; " if diverged else "")
                + f"round {round_}: {len(valid)} usable replies of {len(self._sent)} sampled "
                f"nodes, federation.min_replies is {needed}; left out: "
                + "; ".join(f"node {node}: {reason}" for node, reason in left_out.items())
            )
        valid.sort(key=lambda r: r.partition_id)  # fixed summation order: reproducible runs
        if self.ledger is not None:
            for reply in valid:
                self.ledger.spend(reply.partition_id, reply.metrics)
        counts = [float(r.num_examples) for r in valid]
        weights = self.pooled_weights([r.weights for r in valid], counts)
        weights, diagnostics = self.server_step(round_, weights, valid)
        self._refuse_non_finite(round_, weights, len(valid))
        diagnostics |= self._anchor_diagnostics(valid)
        if self.ledger is not None:
            diagnostics["epsilon"] = self.ledger.worst()
        personal = personal_accuracy(valid)
        train_loss = (example_mean(valid, counts, "train_loss")
                      if self.ledger is None else math.nan)  # private replies withhold it
        train_ce = (example_mean(valid, counts, "train_ce")
                    if all("train_ce" in r.metrics for r in valid) else None)
        client_seconds = [r.metrics["client-seconds"] for r in valid]
        spans = [(r.metrics["client-started"], r.metrics["client-started"] + seconds)
                 for r, seconds in zip(valid, client_seconds, strict=True)
                 if "client-started" in r.metrics]
        end = time.perf_counter()
        self.report = RoundReport(
            train_loss=train_loss,
            train_ce=train_ce,
            client_seconds=sum(client_seconds),
            client_seconds_max=max(client_seconds),
            client_busy_seconds=busy_seconds(spans, self._round_started, replied),
            server_seconds=end - start,
            wall_seconds=end - self._round_start,
            bytes_up=sum(record_nbytes(r) for m in replies if not m.has_error()
                         for r in m.content.array_records.values()),
            bytes_down=self._bytes_down,
            participants=[r.partition_id for r in valid],
            left_out=[{"node": node, "reason": reason} for node, reason in left_out.items()],
            diagnostics=diagnostics,
            personal=personal,
        )
        metrics = MetricRecord({"train_loss": train_loss, "clients": len(valid)})
        return tensors_to_record(weights), metrics

    def _refuse_non_finite(self, round_: int, weights: dict[str, torch.Tensor],
                           replies: int) -> None:
        """End the run before a NaN or Inf that finite but exploding replies made on the server
        (an averaged weight, a trained anchor) is sent out or checkpointed."""
        bad = [name for name, value in weights.items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        found = self.global_anchors()
        if found is not None and not bool(torch.isfinite(found[0][found[1]]).all()):
            bad.append("the global anchors")
        if bad:
            raise TrainingDiverged(
                round_, f"training diverged: round {round_}: the server step over {replies} "
                f"usable replies gave NaN or Inf in {', '.join(bad[:3])}"
                + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))

    def pooled_weights(self, states: list[dict[str, torch.Tensor]],
                       counts: list[float]) -> dict[str, torch.Tensor]:
        """The round's weights: sample-weighted mean, or the robust rule configured."""
        if self.pooling is None:
            return weighted_average(states, counts)
        return self.pooling.states(states)

    def pooled_classes(self, values: torch.Tensor, present: torch.Tensor,
                       own: torch.Tensor) -> torch.Tensor:
        """Per-class statistics (K, C, ...) of the clients holding each class (`present`,
        (K, C)): the method's `own` average under "mean", else the robust rule over holders."""
        return own if self.pooling is None else self.pooling.classes(values, present)

    def _anchor_diagnostics(self, replies: list[ClientReply]) -> dict[str, float]:
        """Separation and movement of the anchors, and the clients' consistency with the
        anchors they were sent (see `diagnostics`)."""
        found = self.global_anchors()
        if found is None:
            return {}
        anchors, present = found
        out = anchor_cosines(anchors, present)
        if self._anchors_sent is not None:
            before, before_present = self._anchors_sent
            both = present & before_present
            if bool(both.any()):
                out["anchor_movement"] = relative_change(before, anchors, both)
        values = [r.metrics["consistency"] for r in replies if "consistency" in r.metrics]
        return out | spread([v for v in values if math.isfinite(v) and abs(v) <= 1.0],
                            "consistency")

    # ---- reply validation ---------------------------------------------------------------
    def _validate(self, round_: int, replies: list[Message]
                  ) -> tuple[list[ClientReply], dict[int, str], set[int]]:
        """The usable replies, why each other sampled node is left out of the round, and
        which of those sent NaN or Inf.

        A reply belongs to the node its message was sent to: the SuperLink answers for a
        node that stopped sending heartbeats with an error reply of its own (sender id 1).
        The sender id is used only for a reply to no message of this round.
        """
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        valid: list[ClientReply] = []
        left_out: dict[int, str] = {}
        non_finite: set[int] = set()
        for message in replies:
            meta = message.metadata
            node = sent.get(meta.reply_to_message_id, meta.src_node_id)
            if node in left_out or any(r.node_id == node for r in valid):
                log(WARNING, "round %d: a second reply for node %d ignored", round_, node)
            elif message.has_error():
                left_out[node] = error_reason(message.error)
            else:
                try:
                    valid.append(self._decode(node, message))
                except PayloadError as exc:
                    left_out[node] = f"invalid reply, rejected: {exc}"
                    if isinstance(exc, NonFinite):
                        non_finite.add(node)
        replied = {r.node_id for r in valid} | set(left_out)
        for node in sent.values():
            if node not in replied:
                left_out[node] = (f"no reply within federation.round_timeout = "
                                  f"{self.cfg.federation.round_timeout:g} s")
        for node, reason in left_out.items():
            log(WARNING, "round %d: node %d left out: %s", round_, node, reason)
        log(INFO, "round %d: %d replies used, %d left out", round_, len(valid), len(left_out))
        return valid, left_out, non_finite

    @property
    def record_keys(self) -> RecordKeys:
        """The record keys this strategy sends and reads (Flower's `FedAvg` attributes)."""
        return RecordKeys(self.arrayrecord_key, self.configrecord_key, self.metricrecord_key,
                          self.weighted_by_key)

    def _decode(self, node: int, message: Message) -> ClientReply:
        content, keys = message.content, self.record_keys
        if keys.arrays not in content.array_records or keys.metrics not in content.metric_records:
            raise PayloadError(f"reply lacks the '{keys.arrays}' or '{keys.metrics}' record")
        metrics = dict(content.metric_records[keys.metrics])
        required = REQUIRED_METRICS if self.ledger is None else PRIVATE_METRICS
        for key in (keys.examples, *required):
            value = metrics.get(key)
            if not isinstance(value, int | float) or not math.isfinite(value):
                error = NonFinite if isinstance(value, int | float) else PayloadError
                raise error(f"metric '{key}' is missing or not a finite number: {value!r}")
        if metrics[keys.examples] <= 0:
            raise PayloadError(f"{keys.examples} must be positive, got {metrics[keys.examples]}")
        if self.ledger is not None:
            check_privacy_report(metrics, int(metrics[keys.examples]), self.cfg.train)
        weights = check_state_dict(content.array_records[keys.arrays], self.reference_state,
                                   "model weights")
        return ClientReply(node, int(metrics["partition-id"]), int(metrics[keys.examples]),
                           weights, metrics, self.decode_extra(content))
