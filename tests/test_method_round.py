"""One round of every method in this process, through the real client and strategy code.

The messages are built as Flower's strategies build them, handed to the ClientApp's handler
and the replies to the Strategy's aggregation: everything but the engine. The clients run on
the GPU when one is visible (the check for GPU SuperNodes), else on the CPU.
"""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedhpro_flwr.client import handle_train
from fedhpro_flwr.config import STRATEGY_KEY, ExperimentConfig
from fedhpro_flwr.data import dataset_spec, held_out_data
from fedhpro_flwr.methods import METHODS, get_method
from fedhpro_flwr.methods.fedprox import MU_KEY
from fedhpro_flwr.models import build_model
from fedhpro_flwr.payload import tensors_to_record

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_CLIENTS = 3
CFG = ExperimentConfig.from_dict({
    "partition": {"num_partitions": NUM_CLIENTS},
    "train": {"local_epochs": 1},
    "fedtgp": {"server_epochs": 10},
    "creff": {"epochs": 20, "repeat_num": 2},
    "fedhpro": {"recal_epochs": 20},
})


@pytest.fixture(scope="module", autouse=True)
def serverapp_identity():
    """Who is sending: set as Flower's ServerApp runtime sets it, undone afterwards."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def training_message(name, strategy, arrays: ArrayRecord, node_id: int) -> Message:
    config = ConfigRecord({STRATEGY_KEY: name, **CFG.to_flat(), "server-round": 1,
                           **dataset_spec(CFG).to_config()})
    if name == "fedprox":
        config[MU_KEY] = strategy.proximal_mu  # what Flower's FedProx.configure_train adds
    content = RecordDict({"arrays": arrays, "config": config, **strategy.train_records()})
    return Message(content=content, dst_node_id=node_id, message_type="train")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_round_of_each_method(name):
    info = dataset_spec(CFG)
    torch.manual_seed(CFG.seed)
    model = build_model(CFG.model, info)
    strategy = get_method(name).make_strategy(CFG, model.state_dict(), info.num_classes,
                                              model.feature_dim)
    arrays = tensors_to_record(model.state_dict())
    replies = []
    for pid in range(NUM_CLIENTS):
        node_config = {"partition-id": pid, "num-partitions": NUM_CLIENTS, "device": DEVICE}
        context = Context(run_id=1, node_id=100 + pid, node_config=node_config,
                          state=RecordDict(), run_config={})
        replies.append(handle_train(training_message(name, strategy, arrays, 100 + pid),
                                    context))

    new_arrays, metrics = strategy.aggregate_train(1, replies)
    assert new_arrays is not None and metrics is not None
    row = strategy.last_round
    assert row["clients"] == NUM_CLIENTS and row["failures"] == 0
    assert all(math.isfinite(v) for v in row.values())

    before, after = model.state_dict(), new_arrays.to_torch_state_dict()
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    model.load_state_dict(after)
    model.to(DEVICE)
    scores = strategy.evaluate_model(model, held_out_data(CFG), torch.device(DEVICE))
    assert math.isfinite(scores["loss"])  # (round 1 of the re-training methods is near chance)
    assert all(0.0 <= v <= 1.0 for k, v in scores.items() if k.endswith("accuracy"))

    state = strategy.state_dict()
    fresh = get_method(name).make_strategy(CFG, model.state_dict(), info.num_classes,
                                           model.feature_dim)
    fresh.load_state_dict(state)
