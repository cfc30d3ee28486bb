"""Encoding of the tensors that travel in Flower messages, their validation, and why a
reply is unusable.

Every decoder checks names, shapes, dtypes and finiteness and raises `PayloadError` with
what is wrong, so a bad message is rejected before it can touch any global state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, RecordDict
from flwr.common.constant import ErrorCode

from fedhpro_flwr.algorithms.extraction import ClassStatistics

# the experiment's config (common sections and the running method's), flat, in every
# training message beside Flower's own config record
EXPERIMENT_RECORD = "experiment"
# the names under which the strategy sends the weights and its config, and wants the reply's
# weights, metrics and example count (`RecordKeys`), in every training message
RECORD_KEYS_RECORD = "record-keys"


@dataclass(frozen=True)
class RecordKeys:
    """The record keys Flower's strategies let a user choose (`FedAvg`'s `arrayrecord_key`,
    `configrecord_key`, `weighted_by_key`, and the reply's metrics), at Flower's defaults.
    The strategy sends them with every training message, so that a client reads and replies
    under the keys that strategy chose."""

    arrays: str = "arrays"
    config: str = "config"
    metrics: str = "metrics"
    examples: str = "num-examples"  # the metric weighting a reply in the average

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def of(cls, content: RecordDict) -> RecordKeys:
        """The keys a training message names; Flower's defaults if it names none."""
        if RECORD_KEYS_RECORD not in content.config_records:
            return cls()
        named = content.config_records[RECORD_KEYS_RECORD]
        values = {f.name: named.get(f.name) for f in fields(cls)}
        wrong = {k: v for k, v in values.items() if not isinstance(v, str) or not v}
        if wrong:
            raise PayloadError(f"the server's '{RECORD_KEYS_RECORD}' record must name every "
                               f"record key as a non-empty string; got {wrong}")
        return cls(**values)


FLOWER_KEYS = RecordKeys()  # Flower's defaults


class PayloadError(ValueError):
    """A message carries missing, malformed or non-finite arrays."""


class NonFinite(PayloadError):
    """A message carries NaN or Inf: what a client sends once its training has diverged."""


# the error codes of a reply whose node ran the ClientApp and saw it fail
CLIENT_FAILURES = (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.CLIENT_APP_CRASHED,
                   ErrorCode.LOAD_CLIENT_APP_EXCEPTION)


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a client's error (the exception itself, not its traceback
    through Flower and Ray), without terminal colour codes."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()]
    line = next((line for line in reversed(lines) if line), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_reason(error: Error) -> str:
    """Why an error reply leaves its node out, in one line: the SuperLink's verdict on a
    node that stopped sending heartbeats (a dead or cut-off machine), the node's ClientApp
    failing, or another of Flower's errors (named by its code)."""
    if error.code == ErrorCode.NODE_UNAVAILABLE:
        return "node unavailable: no heartbeat reached the SuperLink in time"
    if error.code in CLIENT_FAILURES:
        return f"client crashed: {last_line(error.reason)}"
    return f"failed (Flower error code {error.code}): {last_line(error.reason)}"


def required_record(content: RecordDict, name: str,
                    what: str = "the server's message") -> ArrayRecord:
    """The ArrayRecord `name` of a message's content, or a PayloadError saying it is missing."""
    if name not in content.array_records:
        raise PayloadError(f"{what} lacks the '{name}' record")
    return content.array_records[name]


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord (array data, without message framing)."""
    return sum(len(array.data) for array in record.values())


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as Flower Arrays (copied to CPU)."""
    return ArrayRecord(
        {k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()}
    )


def record_to_tensors(
    record: ArrayRecord, expected: Mapping[str, tuple[tuple[int | None, ...], str]], what: str
) -> dict[str, torch.Tensor]:
    """Decode and check: `expected` maps each name to (shape with None for free axes, kind).

    kind is "float" (float32, all finite), "real" (float32 or float16, all finite, returned
    as float32) or "int" (int64).
    """
    missing = sorted(set(expected) - set(record.keys()))
    extra = sorted(set(record.keys()) - set(expected))
    if missing or extra:
        raise PayloadError(f"{what}: missing arrays {missing}, unexpected arrays {extra}")
    out = {}
    for name, (shape, kind) in expected.items():
        try:
            array = record[name].numpy()
        except Exception as exc:  # corrupt bytes or unknown dtype
            raise PayloadError(f"{what}: array '{name}' cannot be decoded: {exc}") from exc
        allowed = {"float": (np.float32,), "real": (np.float32, np.float16),
                   "int": (np.int64,)}[kind]
        if array.dtype not in allowed:
            raise PayloadError(f"{what}: array '{name}' has dtype {array.dtype}, expected "
                               + " or ".join(str(np.dtype(a)) for a in allowed))
        if len(array.shape) != len(shape) or any(
            s is not None and s != a for s, a in zip(shape, array.shape, strict=True)
        ):
            shown = tuple("*" if s is None else s for s in shape)
            raise PayloadError(f"{what}: array '{name}' has shape {array.shape}, "
                               f"expected {shown}")
        if kind != "int" and not np.isfinite(array).all():
            raise NonFinite(f"{what}: array '{name}' contains NaN or Inf")
        out[name] = torch.from_numpy(array.astype(np.float32) if kind == "real"
                                     else array.copy())
    return out


def check_state_dict(
    record: ArrayRecord, reference: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Decode model weights and check them against the reference model's state dict."""
    expected = {
        name: (tuple(t.shape), "float" if t.is_floating_point() else "int")
        for name, t in reference.items()
    }
    return record_to_tensors(record, expected, what)


def encode_class_rows(present: torch.Tensor, rows: Mapping[str, torch.Tensor],
                      counts: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> ArrayRecord:
    """Per-class rows of only the `present` classes, as `dtype` (float16 halves the bytes);
    `classes` says which rows they are."""
    classes = torch.nonzero(present).flatten()
    tensors = {"classes": classes, **{name: t[classes].to(dtype) for name, t in rows.items()}}
    if counts is not None:
        tensors["counts"] = counts.to(torch.int64)
    return tensors_to_record(tensors)


@dataclass(frozen=True)
class ClassRows:
    """A decoded `encode_class_rows` record; rows of absent classes are zeros."""

    present: torch.Tensor  # (C,) bool
    rows: dict[str, torch.Tensor]  # each (C, ...)
    counts: torch.Tensor | None  # (C,) int64, when the record carries counts


def decode_class_rows(
    record: ArrayRecord,
    num_classes: int,
    row_shapes: Mapping[str, tuple[int, ...]],
    what: str,
    with_counts: bool = False,
) -> ClassRows:
    """Inverse of `encode_class_rows`: checks class ids, row counts, shapes and counts."""
    c = num_classes
    expected: dict[str, tuple[tuple[int | None, ...], str]] = {"classes": ((None,), "int")}
    expected |= {name: ((None, *shape), "real") for name, shape in row_shapes.items()}
    if with_counts:
        expected["counts"] = ((c,), "int")
    t = record_to_tensors(record, expected, what)
    classes = t["classes"]
    n = len(classes)
    for name in row_shapes:
        if t[name].shape[0] != n:
            raise PayloadError(f"{what}: '{name}' has {t[name].shape[0]} rows for {n} classes")
    if n and (classes.min() < 0 or classes.max() >= c):
        raise PayloadError(f"{what}: class ids {classes.tolist()} outside 0..{c - 1}")
    if len(torch.unique(classes)) != n:
        raise PayloadError(f"{what}: repeated class ids {classes.tolist()}")
    present = torch.zeros(c, dtype=torch.bool)
    present[classes] = True
    counts = t.get("counts")
    if counts is not None:
        if (counts < 0).any():
            raise PayloadError(f"{what}: negative class counts {counts.tolist()}")
        if not torch.equal(present, counts > 0):
            raise PayloadError(f"{what}: classes {classes.tolist()} disagree with the nonzero "
                               f"counts {counts.tolist()}")

    def scatter(rows: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(c, *rows.shape[1:], dtype=rows.dtype)
        full[classes] = rows
        return full

    return ClassRows(present, {name: scatter(t[name]) for name in row_shapes}, counts)


def without_own_class(grads: torch.Tensor) -> torch.Tensor:
    """(C, C, ...) per-class classifier gradients without each class's own entry [c, c]:
    (C, C - 1, ...). The entry is implied, see `with_own_class`."""
    c = grads.shape[0]
    return grads[~torch.eye(c, dtype=torch.bool)].reshape(c, c - 1, *grads.shape[2:])


def with_own_class(grads: torch.Tensor) -> torch.Tensor:
    """Inverse of `without_own_class`. A CE gradient w.r.t. the logits, softmax minus one-hot,
    sums to zero over the classes, and so do its means times anything: class c's own entry
    is minus the sum of its others."""
    c = grads.shape[0]
    full = grads.new_zeros(c, c, *grads.shape[2:])
    full[~torch.eye(c, dtype=torch.bool)] = grads.flatten(0, 1)
    full[torch.eye(c, dtype=torch.bool)] = -grads.sum(dim=1)
    return full


def encode_class_statistics(stats: ClassStatistics, dtype: torch.dtype = torch.float32,
                            classifier: bool = True, feature_grads: bool = True,
                            moments: bool = False) -> ArrayRecord:
    """Only the classes the client holds, and nothing the server can recompute.

    The classifier gradients (C x C x d per client, the bulk at many classes) travel only when
    `classifier`, without each class's own row (`without_own_class`). The feature gradients
    travel only when `feature_grads`: for a linear head, dCE/dz = W^T dCE/db, so a server that
    knows the classifier weight W the client measured at rebuilds them from the bias
    gradients (`decode_class_statistics`'s `measured_at`). The features' class means and
    spreads (C x d and C) travel when `moments`."""
    if not (classifier or feature_grads or moments):
        raise ValueError("class statistics need the classifier or the feature gradients, or "
                         "the moments")
    rows: dict[str, torch.Tensor] = {}
    if feature_grads:
        rows["feature_grads"] = stats.feature_grads
    if classifier:
        assert stats.weight_grads is not None and stats.bias_grads is not None
        rows["weight_grads"] = without_own_class(stats.weight_grads)
        rows["bias_grads"] = without_own_class(stats.bias_grads)
    if moments:
        assert stats.feature_means is not None and stats.feature_vars is not None
        rows["feature_means"] = stats.feature_means
        rows["feature_vars"] = stats.feature_vars
    return encode_class_rows(stats.present, rows, stats.counts, dtype)


def decode_class_statistics(
    record: ArrayRecord, num_classes: int, feature_dim: int, what: str = "class statistics",
    classifier: bool = True, measured_at: torch.Tensor | None = None, moments: bool = False,
) -> ClassStatistics:
    """Inverse of `encode_class_statistics`, with absent classes back as zero rows.

    `measured_at`: the (C, d) classifier weight the client measured its gradients at; given,
    the record must not carry the feature gradients, which are rebuilt from it."""
    c, d = num_classes, feature_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if measured_at is None:
        shapes["feature_grads"] = (d,)
    elif not classifier:
        raise ValueError("feature gradients can only be rebuilt from the classifier gradients")
    if classifier:
        shapes |= {"weight_grads": (c - 1, d), "bias_grads": (c - 1,)}
    if moments:
        shapes |= {"feature_means": (d,), "feature_vars": ()}
    decoded = decode_class_rows(record, c, shapes, what, with_counts=True)
    assert decoded.counts is not None
    rows = decoded.rows
    if moments and bool((rows["feature_vars"] < 0).any()):
        raise PayloadError(f"{what}: a class's feature variance is negative")
    weight_grads = with_own_class(rows["weight_grads"]) if classifier else None
    bias_grads = with_own_class(rows["bias_grads"]) if classifier else None
    if measured_at is None:
        feature = rows["feature_grads"]
    else:
        assert bias_grads is not None
        feature = bias_grads @ measured_at
    return ClassStatistics(decoded.present, decoded.counts, feature, weight_grads, bias_grads,
                           rows.get("feature_means"), rows.get("feature_vars"))
