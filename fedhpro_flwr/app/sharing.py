"""How a run shares and evaluates: one global model, or personal models.

A run is one of two kinds, chosen once from the config (`sharing_for`), and both the server
and the clients ask that one object instead of branching on the mode:

- `GlobalModel`: every client trains a copy of one model; the whole model is averaged and the
  server evaluates it on the held-out test set.
- `PersonalModels` (`model.backbones` set): client k runs backbone k mod n (or its node
  config's `backbone`), every backbone ending in features of the same dimension d. Each
  client's model stays on the client between rounds (in Flower's `context.state`, and on the
  node's disk for a resumed run: `personal_store`); the
  server sees only the weights the method names in `Method.personal_weights` (FedHPro: the
  linear head) plus its class-level payloads. Accuracy is personalised: every client
  evaluates its own model on a held-out part of its data, and the round's score is the mean.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedhpro_flwr.algorithms.models import Backbone, build_model
from fedhpro_flwr.algorithms.training import evaluate
from fedhpro_flwr.app.checkpoint import CheckpointError
from fedhpro_flwr.app.personal_store import STORE_DIR, PersonalModelStore
from fedhpro_flwr.config import ConfigError, ExperimentConfig
from fedhpro_flwr.data.federated import VALIDATION_STREAM, DataSpec, HeldOut, TensorData
from fedhpro_flwr.data.partition import stratified_split
from fedhpro_flwr.methods import METHODS, Method
from fedhpro_flwr.methods.payload import check_state_dict, tensors_to_record
from fedhpro_flwr.methods.strategy import ExperimentStrategy, RoundReport

LOCAL_MODEL = "local-model"  # a client's whole personal model, in its context.state
STATE_OWNER = "state-owner"  # which experiment the rest of a node's context.state belongs to


@dataclass(frozen=True)
class NodeMemory:
    """What a client has of earlier rounds: its node's context state (kept by Flower for
    one Flower run) and which experiment and round the message is for."""

    state: RecordDict
    experiment_id: str
    server_round: int


@dataclass
class ClientModel:
    """What a client trains this round: the model (holding what the server sent), its
    training data, and, with personal models, the split it evaluates its own model on."""

    model: Backbone
    data: TensorData
    local_test: TensorData | None = None
    local_validation: TensorData | None = None  # with data.validation_fraction
    restored: bool = False  # personal models: continued from the client's earlier round


class Sharing:
    """The steps that differ between the two kinds of run; see the subclasses."""

    # a single model whose evaluation and features mean something before any training
    global_model: bool

    def __init__(self, cfg: ExperimentConfig, method: Method):
        self.cfg, self.method = cfg, method

    def build(self, spec: DataSpec, backbone: tuple[str, int] | None = None) -> Backbone:
        """The configured backbone (or `backbone`, one of `model.backbones`) with what the
        method adds to it (`Method.extend_model`)."""
        model = build_model(self.cfg.model, spec, backbone)
        extend = self.method.extend_model
        return model if extend is None else extend(model, self.cfg)

    # ---- server ---------------------------------------------------------------------------
    def server_model(self, spec: DataSpec) -> Backbone:
        """The model the server evaluates with (and the shapes replies are checked against)."""
        raise NotImplementedError

    def shared(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a model's weights that travels between clients and server."""
        raise NotImplementedError

    def evaluate(self, round_: int, strategy: ExperimentStrategy, model: Backbone,
                 weights: Mapping[str, torch.Tensor], held: HeldOut,
                 device: torch.device) -> dict[str, float]:
        """The round's scores: accuracy, loss and the method's extras on the test data, and
        val_accuracy, val_loss on the validation share when there is one."""
        raise NotImplementedError

    def check_continued(self, round_: int, report: RoundReport, trained_before: set[int]) -> None:
        """The first round of a resumed run: raise `CheckpointError` if the clients that
        trained before it (`trained_before`: partition ids) did not continue where the
        checkpoint left them (all the server's own state is restored)."""

    # ---- client ---------------------------------------------------------------------------
    def client_model(self, spec: DataSpec, data: TensorData, received: ArrayRecord,
                     partition_id: int, node_config: Mapping[str, Any],
                     memory: NodeMemory) -> ClientModel:
        """The model to train, holding the weights received, and the data to train it on."""
        raise NotImplementedError

    def finish(self, trained: ClientModel, partition_id: int, memory: NodeMemory,
               device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """After training: the weights to send, and the client's own metrics."""
        raise NotImplementedError


class GlobalModel(Sharing):
    """One model for all: averaged whole, evaluated on the server's held-out data."""

    global_model = True

    def server_model(self, spec: DataSpec) -> Backbone:
        return self.build(spec)

    def shared(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(state)

    def evaluate(self, round_: int, strategy: ExperimentStrategy, model: Backbone,
                 weights: Mapping[str, torch.Tensor], held: HeldOut,
                 device: torch.device) -> dict[str, float]:
        model.load_state_dict(weights)
        scores = strategy.evaluate_model(model, held.test, device)
        if held.validation is not None:  # the method's own rule (e.g. CReFF's classifier)
            val = strategy.evaluate_model(model, held.validation, device)
            scores |= {"val_accuracy": val["accuracy"], "val_loss": val["loss"]}
        return scores

    def client_model(self, spec: DataSpec, data: TensorData, received: ArrayRecord,
                     partition_id: int, node_config: Mapping[str, Any],
                     memory: NodeMemory) -> ClientModel:
        model = self.build(spec)
        model.load_state_dict(check_state_dict(received, model.state_dict(),
                                               "global model weights"))
        return ClientModel(model, data)

    def finish(self, trained: ClientModel, partition_id: int, memory: NodeMemory,
               device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return trained.model.state_dict(), {}


class PersonalModels(Sharing):
    """Each client keeps its own model (heterogeneous backbones); only the method's
    `personal_weights` are averaged, and each client evaluates its own model."""

    global_model = False

    def __init__(self, cfg: ExperimentConfig, method: Method):
        if method.personal_weights is None:
            usable = sorted(n for n, m in METHODS.items() if m.personal_weights is not None)
            raise ConfigError(
                f"strategy '{method.name}' averages the clients' model weights, which cannot be "
                f"done when they run different backbones (model.backbones = "
                f"{cfg.model.backbones!r}); with heterogeneous clients use one of "
                f"{', '.join(usable)}")
        super().__init__(cfg, method)
        self.keys = method.personal_weights

    def server_model(self, spec: DataSpec) -> Backbone:
        # the server holds no extractor of its own: any backbone gives the shared part's shapes
        return self.build(spec, self.cfg.model.backbone_list()[0])

    def shared(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: state[k] for k in self.keys}

    def evaluate(self, round_: int, strategy: ExperimentStrategy, model: Backbone,
                 weights: Mapping[str, torch.Tensor], held: HeldOut,
                 device: torch.device) -> dict[str, float]:
        report: RoundReport | None = strategy.report
        if report is None or report.personal is None:
            raise ConfigError(f"round {round_}: no client had a sample left for its own test "
                              f"split; raise partition.local_test_fraction")
        personal = report.personal
        scores = {"accuracy": personal.mean, "loss": personal.loss_mean}
        if personal.val_mean is not None:
            scores["val_accuracy"] = personal.val_mean
        return scores

    def check_continued(self, round_: int, report: RoundReport, trained_before: set[int]) -> None:
        expected = [p for p in report.participants if p in trained_before]
        restored = report.personal.models_restored if report.personal else 0
        if restored < len(expected):
            # measured before clients saved their models: FedProto fell from 0.88 to 0.42
            raise CheckpointError(
                f"round {round_} of a resumed run: {len(expected) - restored} of "
                f"{len(expected)} clients that had trained found no personal model of round "
                f"{round_ - 1} or before under <data.root>/{STORE_DIR} on their node (resumed "
                "on other machines, or the files were deleted); continuing would restart "
                "them, so run the experiment afresh (resume=false)")

    def client_model(self, spec: DataSpec, data: TensorData, received: ArrayRecord,
                     partition_id: int, node_config: Mapping[str, Any],
                     memory: NodeMemory) -> ClientModel:
        train, local_test, local_validation = self.local_split(data, partition_id)
        model, restored = self.local_model(spec, self.backbone(partition_id, node_config),
                                           memory, partition_id)
        shared = check_state_dict(received, self.shared(model.state_dict()), "shared weights")
        model.load_state_dict(shared, strict=False)
        return ClientModel(model, train, local_test, local_validation, restored)

    def finish(self, trained: ClientModel, partition_id: int, memory: NodeMemory,
               device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        weights = trained.model.state_dict()
        memory.state[LOCAL_MODEL] = tensors_to_record(weights)
        store = PersonalModelStore(self.cfg, memory.experiment_id, partition_id)
        try:
            store.save(memory.server_round, weights)
        except OSError as exc:  # a read-only or full disk: the run goes on, a resume would not
            logging.getLogger(__name__).warning(
                "personal model not saved to %s (%s); a resumed run could not continue it",
                store.folder, exc)
        metrics: dict[str, float] = {}
        if trained.local_test is not None and len(trained.local_test):
            loss, accuracy = evaluate(trained.model, trained.local_test, device)
            metrics |= {"local_accuracy": accuracy, "local_loss": loss,
                        "local_test_size": len(trained.local_test)}
        if trained.local_validation is not None and len(trained.local_validation):
            loss, accuracy = evaluate(trained.model, trained.local_validation, device)
            metrics |= {"local_val_accuracy": accuracy, "local_val_loss": loss}
        metrics["local_model_restored"] = float(trained.restored)
        return self.shared(weights), metrics

    def backbone(self, partition_id: int, node_config: Mapping[str, Any]) -> tuple[str, int]:
        """The node config's `backbone` (e.g. "resnet10-16"), else entry k mod n of the list."""
        choice = node_config.get("backbone")
        if choice:
            try:
                (found,) = type(self.cfg.model)(backbones=str(choice)).backbone_list()
            except (ConfigError, ValueError):
                raise ConfigError(f"node config 'backbone' = {choice!r}: expected one backbone, "
                                  f"cnn-W or resnet10-W") from None
            return found
        backbones = self.cfg.model.backbone_list()
        return backbones[partition_id % len(backbones)]

    def local_split(self, data: TensorData, partition_id: int
                    ) -> tuple[TensorData, TensorData, TensorData | None]:
        """(train, test, validation): the client's data with `partition.local_test_fraction`
        of every class held out for its personalised evaluation and, with
        `data.validation_fraction`, that share of the rest to score hyper-parameters on; the
        same split every round."""
        seed = self.cfg.seed * 1_000_003 + partition_id
        train, test = stratified_split(data.y.numpy(), self.cfg.partition.local_test_fraction,
                                       seed)
        if not self.cfg.data.validation_fraction:
            return data.subset(train), data.subset(test), None
        keep, held = stratified_split(data.y.numpy()[train], self.cfg.data.validation_fraction,
                                      seed + VALIDATION_STREAM)
        return data.subset(train[keep]), data.subset(test), data.subset(train[held])

    def local_model(self, spec: DataSpec, backbone: tuple[str, int], memory: NodeMemory,
                    partition_id: int) -> tuple[Backbone, bool]:
        """The client's model as it left the last round (from its context state or, in a
        resumed run, its node's disk), or, on its first round, freshly drawn from a seed of
        its own; and whether it was restored."""
        with torch.random.fork_rng():
            torch.manual_seed(client_seed(self.cfg.seed, 0, partition_id))
            model = self.build(spec, backbone)
        if LOCAL_MODEL in memory.state.array_records:
            record = memory.state.array_records[LOCAL_MODEL]
        else:
            store = PersonalModelStore(self.cfg, memory.experiment_id, partition_id)
            on_disk = store.latest(memory.server_round - 1)
            if on_disk is None:
                return model, False
            record = tensors_to_record(on_disk)
        saved = check_state_dict(record, model.state_dict(), "the client's saved model")
        model.load_state_dict(saved)
        return model, True


def claim_node_state(state: RecordDict, experiment_id: str) -> None:
    """Empty a node's context state left by another experiment, and mark it as this one's.

    Flower keeps a node's context state per Flower run, and one run may hold several
    experiments in turn (the benchmark runs a setting's strategies one after another on one
    simulated federation): without this, an experiment's clients would start from the
    personal models another experiment trained.
    """
    owner = state.config_records.get(STATE_OWNER)
    if owner is not None and owner.get("experiment") == experiment_id:
        return
    for key in list(state.keys()):
        del state[key]
    state[STATE_OWNER] = ConfigRecord({"experiment": experiment_id})


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per (run seed, round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


def sharing_for(cfg: ExperimentConfig, method: Method) -> Sharing:
    """Personal models when `model.backbones` names backbones, else one global model."""
    return PersonalModels(cfg, method) if cfg.model.backbone_list() else GlobalModel(cfg, method)
