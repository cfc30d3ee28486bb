import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedhpro_flwr.extraction import ClassStatistics
from fedhpro_flwr.payload import (
    PayloadError,
    check_state_dict,
    decode_class_statistics,
    encode_class_statistics,
    required_record,
    tensors_to_record,
)

C, D = 4, 3


def stats():
    present = torch.tensor([True, False, True, True])
    counts = torch.tensor([5, 0, 2, 9])
    mask = present.float()
    return ClassStatistics(
        present, counts,
        torch.randn(C, D) * mask[:, None],
        torch.randn(C, C, D) * mask[:, None, None],
        torch.randn(C, C) * mask[:, None],
    )


def encoded(**replace):
    record = encode_class_statistics(stats())
    arrays = {k: record[k].numpy() for k in record}
    arrays.update(replace)
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def test_round_trip_sends_only_held_classes():
    original = stats()
    record = encode_class_statistics(original)
    assert record["classes"].numpy().tolist() == [0, 2, 3]
    assert record["weight_grads"].numpy().shape == (3, C, D)
    decoded = decode_class_statistics(record, C, D)
    for name in ("present", "counts", "feature_grads", "weight_grads", "bias_grads"):
        assert torch.equal(getattr(decoded, name), getattr(original, name)), name


def test_float16_upload_halves_the_gradient_bytes_and_decodes_to_float32():
    original = stats()
    half = encode_class_statistics(original, torch.float16)
    full = encode_class_statistics(original)
    for name in ("feature_grads", "weight_grads", "bias_grads"):
        assert half[name].numpy().nbytes * 2 == full[name].numpy().nbytes
    decoded = decode_class_statistics(half, C, D)
    assert decoded.weight_grads.dtype == torch.float32
    assert torch.allclose(decoded.weight_grads, original.weight_grads, rtol=1e-3, atol=1e-3)
    assert torch.equal(decoded.counts, original.counts)


def test_without_classifier_gradients_only_feature_gradients_travel():
    original = stats()
    record = encode_class_statistics(original, classifier=False)
    assert sorted(record.keys()) == ["classes", "counts", "feature_grads"]
    decoded = decode_class_statistics(record, C, D, classifier=False)
    assert torch.equal(decoded.feature_grads, original.feature_grads)
    assert decoded.weight_grads is None and decoded.bias_grads is None
    with pytest.raises(PayloadError, match="missing arrays"):
        decode_class_statistics(record, C, D)  # a server that expects them refuses it
    with pytest.raises(PayloadError, match="unexpected arrays"):
        decode_class_statistics(encode_class_statistics(original), C, D, classifier=False)


def test_model_weights_stay_float32_only():
    with pytest.raises(PayloadError, match="expected float32"):
        check_state_dict(tensors_to_record({"w": torch.ones(2, dtype=torch.float16)}),
                         {"w": torch.zeros(2)}, "weights")


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({"feature_grads": np.zeros((3, D + 1), np.float32)}, "shape"),
        ({"weight_grads": np.zeros((2, C, D), np.float32)}, "rows"),
        ({"feature_grads": np.full((3, D), np.nan, np.float32)}, "NaN or Inf"),
        ({"bias_grads": np.full((3, C), np.inf, np.float32)}, "NaN or Inf"),
        ({"bias_grads": np.full((3, C), np.inf, np.float16)}, "NaN or Inf"),
        ({"feature_grads": np.zeros((3, D), np.float64)}, "dtype"),
        ({"classes": np.array([0, 2, 7])}, "outside"),
        ({"classes": np.array([0, 2, 2])}, "repeated"),
        ({"counts": np.array([5, 0, -2, 9])}, "negative"),
        ({"counts": np.array([5, 1, 2, 9])}, "disagree"),
    ],
)
def test_bad_class_statistics_are_rejected(replace, message):
    with pytest.raises(PayloadError, match=message):
        decode_class_statistics(encoded(**replace), C, D)


def test_missing_or_extra_arrays_are_rejected():
    record = encoded()
    del record["counts"]
    with pytest.raises(PayloadError, match="missing arrays"):
        decode_class_statistics(record, C, D)


def test_state_dict_checks():
    reference = {"w": torch.zeros(2, 2), "n": torch.zeros((), dtype=torch.int64)}
    good = tensors_to_record({"w": torch.ones(2, 2), "n": torch.tensor(3)})
    assert torch.equal(check_state_dict(good, reference, "weights")["w"], torch.ones(2, 2))
    with pytest.raises(PayloadError, match="shape"):
        check_state_dict(tensors_to_record({"w": torch.ones(3), "n": torch.tensor(1)}),
                         reference, "weights")
    with pytest.raises(PayloadError, match="NaN"):
        check_state_dict(tensors_to_record({"w": torch.full((2, 2), float("nan")),
                                            "n": torch.tensor(1)}), reference, "weights")


def test_a_missing_record_is_named():
    content = RecordDict({"arrays": tensors_to_record({"w": torch.zeros(2)})})
    assert required_record(content, "arrays") is content.array_records["arrays"]
    with pytest.raises(PayloadError, match="the server's message lacks the 'hyperprototypes'"):
        required_record(content, "hyperprototypes")
