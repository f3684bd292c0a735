"""The routing breakdown (ESFT's expert choice, the report) feeds the split's CPU windows to
the model on the model's device: a model on the meta device must receive meta inputs."""

import numpy as np
import pytest
import torch

from moekit.config import MoEConfig
from moekit.data.stream import PackedSplit
from moekit.model import ModelConfig, MoETransformer
from moekit.model.routing import routing_breakdown


class Seen(Exception):
    pass


@pytest.mark.parametrize("router_input", ["token", "tag"])
def test_windows_and_tags_go_to_the_models_device(router_input):
    tags = ["de", "en"]
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, router_input=router_input,
                    route_tags=None if router_input == "token" else tags)
    model = MoETransformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, moe=moe))
    model = model.to("meta")
    seen = {}

    def record(module, args, kwargs):
        seen["x"] = args[0].device
        seen["tags"] = kwargs["tags"].device if "tags" in kwargs else None
        raise Seen                          # a meta forward has no values to count: stop here

    model.register_forward_pre_hook(record, with_kwargs=True)
    split = PackedSplit(np.arange(33) % 50, np.array([0, 20]), np.array([0, 1]), tags, 8)
    with pytest.raises(Seen):
        routing_breakdown(model, split, np.zeros(50, dtype=np.int64), batch_size=2)
    assert seen["x"] == torch.device("meta")
    assert seen["tags"] == (None if router_input == "token" else torch.device("meta"))
