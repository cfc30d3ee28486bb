import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedhpro_flwr.algorithms.extraction import ClassStatistics
from fedhpro_flwr.algorithms.gradmatch import class_gradients
from fedhpro_flwr.methods.payload import (
    PayloadError,
    check_state_dict,
    decode_class_statistics,
    encode_class_statistics,
    required_record,
    tensors_to_record,
)

C, D = 4, 3


WEIGHT = torch.randn(C, D, generator=torch.Generator().manual_seed(0))


def stats():
    """Real class statistics (the identities the encoder relies on hold): class 1 absent."""
    present = torch.tensor([True, False, True, True])
    counts = torch.tensor([5, 0, 2, 9])
    mask = torch.zeros(C, 5, dtype=torch.bool)
    for c, n in enumerate(counts.tolist()):
        mask[c, :n] = True
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(C, 5, D, generator=generator) * mask[..., None]
    grads = class_gradients(features, WEIGHT, torch.randn(C, generator=generator), mask)
    means = features.sum(dim=1) / counts.clamp(min=1)[:, None]
    variances = torch.rand(C, generator=generator) * present
    return ClassStatistics(present, counts, grads.feature, grads.weight, grads.bias, means,
                           variances)


def encoded(**replace):
    record = encode_class_statistics(stats())
    arrays = {k: record[k].numpy() for k in record}
    arrays.update(replace)
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def assert_same_statistics(decoded, original, tol=1e-6):
    assert torch.equal(decoded.present, original.present)
    assert torch.equal(decoded.counts, original.counts)
    for name in ("feature_grads", "weight_grads", "bias_grads"):
        assert torch.allclose(getattr(decoded, name), getattr(original, name), atol=tol), name


def test_round_trip_sends_only_held_classes_without_their_own_rows():
    original = stats()
    record = encode_class_statistics(original)
    assert record["classes"].numpy().tolist() == [0, 2, 3]
    assert record["weight_grads"].numpy().shape == (3, C - 1, D)
    assert record["bias_grads"].numpy().shape == (3, C - 1)
    decoded = decode_class_statistics(record, C, D)
    assert torch.equal(decoded.feature_grads, original.feature_grads)
    assert_same_statistics(decoded, original)
    assert (decoded.weight_grads[1] == 0).all()  # absent: zeros, to be masked


def test_feature_gradients_are_rebuilt_at_the_classifier_they_were_measured_at():
    original = stats()
    record = encode_class_statistics(original, feature_grads=False)
    assert sorted(record.keys()) == ["bias_grads", "classes", "counts", "weight_grads"]
    assert_same_statistics(decode_class_statistics(record, C, D, measured_at=WEIGHT), original)
    wrong = decode_class_statistics(record, C, D, measured_at=WEIGHT.flip(0))
    assert not torch.allclose(wrong.feature_grads, original.feature_grads, atol=1e-3)
    with pytest.raises(PayloadError, match="missing arrays"):
        decode_class_statistics(record, C, D)  # a server expecting them refuses the reply
    with pytest.raises(PayloadError, match="unexpected arrays"):
        decode_class_statistics(encode_class_statistics(original), C, D, measured_at=WEIGHT)
    with pytest.raises(ValueError, match="classifier"):
        encode_class_statistics(original, classifier=False, feature_grads=False)


def test_float16_upload_halves_the_gradient_bytes_and_decodes_to_float32():
    original = stats()
    half = encode_class_statistics(original, torch.float16)
    full = encode_class_statistics(original)
    for name in ("feature_grads", "weight_grads", "bias_grads"):
        assert half[name].numpy().nbytes * 2 == full[name].numpy().nbytes
    decoded = decode_class_statistics(half, C, D)
    assert decoded.weight_grads.dtype == torch.float32
    assert_same_statistics(decoded, original, tol=1e-2)


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


def test_moments_travel_in_place_of_the_classifier_gradients():
    original = stats()
    record = encode_class_statistics(original, classifier=False, moments=True)
    assert sorted(record.keys()) == ["classes", "counts", "feature_grads", "feature_means",
                                     "feature_vars"]
    assert record["feature_means"].numpy().shape == (3, D)
    assert record["feature_vars"].numpy().shape == (3,)
    decoded = decode_class_statistics(record, C, D, classifier=False, moments=True)
    for name in ("feature_grads", "feature_means", "feature_vars"):
        assert torch.equal(getattr(decoded, name), getattr(original, name)), name
    with pytest.raises(PayloadError, match="unexpected arrays"):
        decode_class_statistics(record, C, D, classifier=False)
    arrays = {k: record[k].numpy() for k in record}
    arrays["feature_vars"] = np.array([0.5, -0.1, 0.2], np.float32)
    with pytest.raises(PayloadError, match="variance is negative"):
        decode_class_statistics(ArrayRecord({k: Array(v) for k, v in arrays.items()}), C, D,
                                classifier=False, moments=True)


def test_model_weights_stay_float32_only():
    with pytest.raises(PayloadError, match="expected float32"):
        check_state_dict(tensors_to_record({"w": torch.ones(2, dtype=torch.float16)}),
                         {"w": torch.zeros(2)}, "weights")


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        ({"feature_grads": np.zeros((3, D + 1), np.float32)}, "shape"),
        ({"weight_grads": np.zeros((2, C - 1, D), np.float32)}, "rows"),
        ({"weight_grads": np.zeros((3, C, D), np.float32)}, "shape"),  # with own-class rows
        ({"feature_grads": np.full((3, D), np.nan, np.float32)}, "NaN or Inf"),
        ({"bias_grads": np.full((3, C - 1), np.inf, np.float32)}, "NaN or Inf"),
        ({"bias_grads": np.full((3, C - 1), np.inf, np.float16)}, "NaN or Inf"),
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
