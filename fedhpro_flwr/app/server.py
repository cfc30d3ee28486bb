"""The ServerApp's work: resolve the config, build the method's Strategy, run, record.

After every round the model is evaluated (as the run's `Sharing` says), the strategy's round
report becomes a row of results.json and a checkpoint is written, all from
`Strategy.start`'s `evaluate_fn` hook.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedhpro_flwr.algorithms.diagnostics import embedding_of
from fedhpro_flwr.algorithms.models import Backbone, place
from fedhpro_flwr.algorithms.privacy import PrivacyLedger
from fedhpro_flwr.app.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fedhpro_flwr.app.personal_store import trained_partitions
from fedhpro_flwr.app.results import RunResults
from fedhpro_flwr.app.sharing import sharing_for
from fedhpro_flwr.config import (
    EXPERIMENT_ID_KEY,
    STRATEGY_KEY,
    ConfigError,
    RunSettings,
    resolve_run_config,
)
from fedhpro_flwr.data.federated import TensorData, dataset_spec, held_out
from fedhpro_flwr.methods import SECTIONS, get_method
from fedhpro_flwr.methods.payload import check_state_dict, tensors_to_record
from fedhpro_flwr.methods.strategy import (
    ExperimentStrategy,
    RoundReport,
    TooFewReplies,
    TrainingDiverged,
)

# Errors whose message says everything a user needs (logged without a traceback): a bad
# setting or missing data, an unusable checkpoint, a round with too few usable replies.
# The checkpoint of the last completed round stays as it was.
RUN_STOPPERS = (ConfigError, CheckpointError, TooFewReplies)


class RunStopped(Exception):
    """What the ServerApp raises for a RUN_STOPPERS error. An exception, not SystemExit:
    Flower then marks the run failed at once, with the message as its status details, and
    uploads the log (on SystemExit the SuperLink only learns from the missing heartbeat, a
    minute later, and the log's last lines are lost)."""


def run_server(grid: Grid, run_config: Mapping[str, Any], app_dir: Path) -> dict[str, Any]:
    """Run one experiment end to end; returns what results.json holds."""
    settings = resolve_run_config(run_config, app_dir, SECTIONS)
    return run_experiment(grid, settings)


def run_experiment(grid: Grid, settings: RunSettings) -> dict[str, Any]:
    cfg = settings.experiment
    total_rounds = cfg.federation.rounds
    log(INFO, "fedhpro-flwr: strategy=%s config=%s rounds=%d seed=%d out-dir=%s",
        settings.strategy, settings.config_path, total_rounds, cfg.seed, settings.out_dir)
    torch.manual_seed(cfg.seed)
    if cfg.federation.server_threads:
        # The server step is many small tensor ops: extra threads only add synchronisation,
        # and thrash when clients share the machine (measured here under client load: 0.26 s
        # for the default step with one thread, 11 s with two).
        torch.set_num_threads(cfg.federation.server_threads)
    spec = dataset_spec(cfg)
    held = held_out(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = get_method(settings.strategy)
    mode = sharing_for(cfg, method)
    model = mode.server_model(spec)
    reference = mode.shared(model.state_dict())
    strategy = method.make_strategy(cfg, reference, spec.num_classes, model.feature_dim)
    results = RunResults(settings, spec.num_classes)
    arrays = tensors_to_record(reference)
    if settings.resume:
        checkpoint = load_checkpoint(settings.out_dir, settings.strategy, cfg)
        restored = check_state_dict(tensors_to_record(checkpoint.weights), reference,
                                    "checkpoint weights")
        strategy.load_state_dict(checkpoint.strategy_state)
        checkpoint.restore_rng()
        results.restore(checkpoint.results)
        if strategy.ledger is not None:
            strategy.ledger = PrivacyLedger(cfg.privacy, checkpoint.results.get("privacy"))
        arrays = tensors_to_record(restored)
        strategy.round_offset = checkpoint.round
        log(INFO, "resuming from %s/checkpoint.pt after round %d", settings.out_dir,
            checkpoint.round)
    place(model, device)

    def end_of_round(server_round: int, round_arrays: ArrayRecord) -> MetricRecord | None:
        round_ = strategy.absolute_round(server_round)
        if server_round == 0 and (round_ or not mode.global_model):
            return None  # evaluated by the run that started it, or nothing to evaluate yet
        start = time.perf_counter()
        weights = round_arrays.to_torch_state_dict()
        scores = mode.evaluate(round_, strategy, model, weights, held, device)
        if server_round == 0:
            results.set_initial(scores)
            log(INFO, "initial model: accuracy %.4f loss %.4f", scores["accuracy"],
                scores["loss"])
        else:
            assert strategy.report is not None  # aggregate_train ran before this
            if settings.resume and server_round == 1:
                mode.check_continued(round_, strategy.report,
                                     trained_partitions(results.data["rounds"]))
            record_round(round_, scores, time.perf_counter() - start, strategy.report)
            if round_ in cfg.diagnostics.rounds() and mode.global_model:
                save_embedding(round_, strategy, model, held.test, device)
            save_checkpoint(Checkpoint.capture(
                settings.strategy, round_, weights,
                strategy.state_dict(), results.data,
            ), settings.out_dir)
        results.write()
        return MetricRecord({"accuracy": scores["accuracy"], "loss": scores["loss"]})

    def record_round(round_: int, scores: dict[str, float], eval_seconds: float,
                     report: RoundReport) -> None:
        results.add_round({"round": round_, **scores, "eval_seconds": eval_seconds,
                           **report.row()})
        if strategy.ledger is not None:
            results.data["privacy"] = strategy.ledger.to_json()
            log(INFO, "[round %d/%d] privacy: epsilon %.3f at delta %g (the largest of any "
                "client's, over the run so far)", round_, total_rounds,
                results.data["privacy"]["epsilon"], cfg.privacy.delta)
        log(INFO, "[round %d/%d] accuracy %.4f loss %.4f train_loss %.4f | client %.1fs "
            "server %.2fs wall %.1fs", round_, total_rounds, scores["accuracy"], scores["loss"],
            report.train_loss, report.client_seconds, report.server_seconds,
            report.wall_seconds)

    def save_embedding(round_: int, strategy: ExperimentStrategy, model: Backbone,
                       test: TensorData, device: torch.device) -> None:
        """A 2-D picture of the test features and the method's anchors, if it has any."""
        anchors = strategy.global_anchors()
        if anchors is None:
            return
        picture = embedding_of(model, test, *anchors, cfg.diagnostics.embedding_samples,
                               cfg.seed, device)
        (settings.out_dir / f"embedding-round{round_}.json").write_text(
            json.dumps({"round": round_, "strategy": settings.strategy, **picture}))

    remaining = total_rounds - strategy.round_offset
    if remaining > 0:
        try:
            strategy.start(
                grid=grid,
                initial_arrays=arrays,
                num_rounds=remaining,
                timeout=cfg.federation.round_timeout,
                train_config=ConfigRecord({STRATEGY_KEY: settings.strategy,
                                           EXPERIMENT_ID_KEY: results.data["experiment_id"],
                                           **spec.to_config()}),
                evaluate_fn=end_of_round,
            )
        except TooFewReplies as exc:  # the rounds before it stand, and so does the checkpoint
            results.data["stopped"] = str(exc)
            if isinstance(exc, TrainingDiverged):  # an outcome a benchmark scores, see there
                results.data["diverged_round"] = exc.round
            results.write()
            raise
    else:
        log(INFO, "checkpoint already holds all %d rounds; nothing to run", total_rounds)
    path = results.write()
    log(INFO, "results written to %s (final accuracy %.4f, best %.4f)", path,
        results.data.get("final_accuracy", float("nan")),
        results.data.get("best_accuracy", float("nan")))
    return results.data
