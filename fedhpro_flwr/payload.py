"""Encoding of the tensors that travel in Flower messages, and their validation.

Every decoder checks names, shapes, dtypes and finiteness and raises `PayloadError` with
what is wrong, so a bad message is rejected before it can touch any global state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from .extraction import ClassStatistics


class PayloadError(ValueError):
    """A message carries missing, malformed or non-finite arrays."""


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
            raise PayloadError(f"{what}: array '{name}' contains NaN or Inf")
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


def _gradient_rows(classifier: bool) -> tuple[str, ...]:
    return ("feature_grads", "weight_grads", "bias_grads") if classifier else ("feature_grads",)


def encode_class_statistics(stats: ClassStatistics, dtype: torch.dtype = torch.float32,
                            classifier: bool = True) -> ArrayRecord:
    """Only the classes the client holds are sent; the classifier gradients (C x C x d per
    client, the bulk at many classes) only when `classifier`."""
    rows = {name: getattr(stats, name) for name in _gradient_rows(classifier)}
    return encode_class_rows(stats.present, rows, stats.counts, dtype)


def decode_class_statistics(
    record: ArrayRecord, num_classes: int, feature_dim: int, what: str = "class statistics",
    classifier: bool = True,
) -> ClassStatistics:
    """Inverse of `encode_class_statistics`, with absent classes back as zero rows."""
    c, d = num_classes, feature_dim
    names = _gradient_rows(classifier)
    shapes = dict(zip(names, ((d,), (c, d), (c,)), strict=False))
    decoded = decode_class_rows(record, c, shapes, what, with_counts=True)
    assert decoded.counts is not None
    return ClassStatistics(decoded.present, decoded.counts, decoded.rows["feature_grads"],
                           decoded.rows.get("weight_grads"), decoded.rows.get("bias_grads"))
