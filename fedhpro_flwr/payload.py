"""Encoding of the tensors that travel in Flower messages, and their validation.

Every decoder checks names, shapes, dtypes and finiteness and raises `PayloadError` with
what is wrong, so a bad message is rejected before it can touch any global state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from .extraction import ClassStatistics


class PayloadError(ValueError):
    """A message carries missing, malformed or non-finite arrays."""


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

    kind is "float" (float32, all finite) or "int" (int64).
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
        want_dtype = np.float32 if kind == "float" else np.int64
        if array.dtype != want_dtype:
            raise PayloadError(f"{what}: array '{name}' has dtype {array.dtype}, "
                               f"expected {np.dtype(want_dtype)}")
        if len(array.shape) != len(shape) or any(
            s is not None and s != a for s, a in zip(shape, array.shape, strict=True)
        ):
            shown = tuple("*" if s is None else s for s in shape)
            raise PayloadError(f"{what}: array '{name}' has shape {array.shape}, "
                               f"expected {shown}")
        if kind == "float" and not np.isfinite(array).all():
            raise PayloadError(f"{what}: array '{name}' contains NaN or Inf")
        out[name] = torch.from_numpy(array.copy())
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


def encode_class_statistics(stats: ClassStatistics) -> ArrayRecord:
    """Only the classes the client holds are sent; `classes` says which rows they are."""
    classes = torch.nonzero(stats.present).flatten()
    return tensors_to_record({
        "classes": classes,
        "counts": stats.counts.to(torch.int64),
        "feature_grads": stats.feature_grads[classes],
        "weight_grads": stats.weight_grads[classes],
        "bias_grads": stats.bias_grads[classes],
    })


def decode_class_statistics(
    record: ArrayRecord, num_classes: int, feature_dim: int, what: str = "class statistics"
) -> ClassStatistics:
    """Inverse of `encode_class_statistics`, with absent classes back as zero rows."""
    c, d = num_classes, feature_dim
    t = record_to_tensors(record, {
        "classes": ((None,), "int"),
        "counts": ((c,), "int"),
        "feature_grads": ((None, d), "float"),
        "weight_grads": ((None, c, d), "float"),
        "bias_grads": ((None, c), "float"),
    }, what)
    classes, counts = t["classes"], t["counts"]
    n = len(classes)
    for name in ("feature_grads", "weight_grads", "bias_grads"):
        if t[name].shape[0] != n:
            raise PayloadError(f"{what}: '{name}' has {t[name].shape[0]} rows for {n} classes")
    if n and (classes.min() < 0 or classes.max() >= c):
        raise PayloadError(f"{what}: class ids {classes.tolist()} outside 0..{c - 1}")
    if len(torch.unique(classes)) != n:
        raise PayloadError(f"{what}: repeated class ids {classes.tolist()}")
    if (counts < 0).any():
        raise PayloadError(f"{what}: negative class counts {counts.tolist()}")
    present = torch.zeros(c, dtype=torch.bool)
    present[classes] = True
    if not torch.equal(present, counts > 0):
        raise PayloadError(f"{what}: classes {classes.tolist()} disagree with the nonzero "
                           f"counts {counts.tolist()}")

    def scatter(rows: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(c, *rows.shape[1:], dtype=rows.dtype)
        full[classes] = rows
        return full

    return ClassStatistics(
        present, counts, scatter(t["feature_grads"]), scatter(t["weight_grads"]),
        scatter(t["bias_grads"]),
    )
