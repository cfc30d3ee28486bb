"""Clients that lie, for measuring robust pooling: a benchmark option, never part of the app.

`attacking_app(attack)` is the app's ClientApp whose first `attack.clients` partitions lie.
Three lies rewrite what they send after training, each a well-formed reply (the server's
validation passes it):

- ``scale``: the weight update and every real-valued class statistic multiplied by `factor`;
- ``sign-flip``: the same multiplied by ``-factor`` (the update points the other way; a
  spread, such as FedHPro's feature variances, is scaled by ``factor`` instead);
- ``class-swap``: the class rows relabelled in reverse order of the classes the client holds
  (its prototypes, gradients and moments of class a are sent as those of class b) and the
  classifier's rows reversed to match.

and one poisons the data before it: ``label-flip`` trains on labels c -> C - 1 - c, so every
upload is an honest client's, of the wrong data.

Integer arrays (class indices, counts, BatchNorm counters) are kept, except the relabelling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedhpro_flwr.app.client import DataView, handle_query, handle_train
from fedhpro_flwr.data.federated import TensorData
from fedhpro_flwr.methods.payload import RecordKeys

KINDS = ("scale", "sign-flip", "class-swap", "label-flip")
CLASSIFIER = "classifier.weight", "classifier.bias"


@dataclass(frozen=True)
class Attack:
    kind: str
    clients: int  # partitions 0 .. clients - 1 lie
    factor: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attack '{self.kind}': one of {', '.join(KINDS)}")
        if self.clients < 0:
            raise ValueError(f"attack clients {self.clients}: must be 0 or more")

    @staticmethod
    def parse(text: str) -> Attack:
        """"sign-flip:2" or "scale:1:5": kind, attacking clients and the factor."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"--attack '{text}': expected KIND:CLIENTS[:FACTOR], e.g. "
                             f"sign-flip:2")
        try:
            return Attack(parts[0], int(parts[1]), *(float(p) for p in parts[2:]))
        except ValueError as exc:
            raise ValueError(f"--attack '{text}': {exc}") from exc


def _lie(received: np.ndarray | None, sent: np.ndarray, multiplier: float) -> np.ndarray:
    if not np.issubdtype(sent.dtype, np.floating):
        return sent
    base = received if received is not None else np.zeros_like(sent)
    return (base + multiplier * (sent - base)).astype(sent.dtype)


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def lie(attack: Attack, received: Message, reply: Message) -> Message:
    """The reply with its records rewritten by `attack` (weights against those `received`)."""
    keys = RecordKeys.of(received.content)
    start = _arrays(received.content.array_records[keys.arrays])
    content = reply.content
    for name, record in list(content.array_records.items()):
        arrays = _arrays(record)
        is_weights = name == keys.arrays
        if attack.kind == "class-swap":
            if is_weights:
                for key in CLASSIFIER:
                    if key in arrays:
                        arrays[key] = arrays[key][::-1]
            elif "classes" in arrays:
                arrays["classes"] = arrays["classes"][::-1]
        else:
            multiplier = attack.factor * (1.0 if attack.kind == "scale" else -1.0)
            # a spread stays a spread (a negative one would only be rejected, not believed)
            arrays = {key: _lie(start.get(key) if is_weights else None, a,
                                abs(multiplier) if "vars" in key else multiplier)
                      for key, a in arrays.items()}
        content.array_records[name] = _record(arrays)
    return reply


def flipped_labels(attack: Attack) -> DataView:
    """The data view of `label-flip`: the attackers' labels reversed, the others' kept."""

    def view(data: TensorData, partition: int) -> TensorData:
        if partition >= attack.clients:
            return data
        return dataclasses.replace(data, y=data.num_classes - 1 - data.y)

    return view


def attacking_app(attack: Attack) -> ClientApp:
    """The app's ClientApp, whose first `attack.clients` partitions lie."""
    app = ClientApp()
    poisons = attack.kind == "label-flip"

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = handle_train(msg, context, flipped_labels(attack) if poisons else None)
        if reply.has_error() or poisons:
            return reply
        metrics: MetricRecord = reply.content[RecordKeys.of(msg.content).metrics]
        if int(metrics["partition-id"]) < attack.clients:
            return lie(attack, msg, reply)
        return reply

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    return app
