"""GlobalOptimManager: the singleton, overrides, module overrides, the per-parameter lookup."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from cupyquant.torch import Embedding, GlobalOptimManager


@pytest.fixture
def manager():
    mng = GlobalOptimManager.get_instance()
    mng.initialize()
    yield mng
    mng.initialize()


def test_singleton():
    assert GlobalOptimManager.get_instance() is GlobalOptimManager.get_instance()
    with pytest.raises(RuntimeError, match="call GlobalOptimManager.get_instance"):
        GlobalOptimManager()


def test_override_config_and_lookup(manager):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    manager.override_config(model[0].weight, "optim_bits", 32)
    manager.override_config([model[1].weight, model[1].bias], key_value_dict={"lr": 0.1, "betas": (0.8, 0.9)})
    assert manager.uses_config_override
    params = list(model.parameters())
    manager.register_parameters(params)
    assert manager.get_config(0, 0, {"optim_bits": 8, "lr": 1.0}) == {"optim_bits": 32, "lr": 1.0}
    assert manager.get_config(0, 1, {"optim_bits": 8}) == {"optim_bits": 8}
    assert manager.get_config(0, 2)["lr"] == 0.1
    assert manager.config_for(model[1].bias) == {"lr": 0.1, "betas": (0.8, 0.9)}
    manager.override_config(model[1].bias, "lr", 0.2)
    assert manager.config_for(model[1].weight)["lr"] == 0.1  # each parameter has its own dict


def test_register_parameters_by_group(manager):
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    manager.override_config(b, "optim_bits", 32)
    manager.register_parameters([{"params": [a]}, {"params": [b]}])
    assert manager.index2config == {(1, 0): {"optim_bits": 32}}
    manager.register_parameters([])


def test_module_override_resolved_against_an_optimizer(manager):
    emb = Embedding(10, 4)
    linear = nn.Linear(4, 4)
    optimizer = torch.optim.SGD([{"params": linear.parameters()}, {"params": emb.parameters()}], lr=1.0)
    manager.check_overrides(optimizer.param_groups)
    assert manager.get_config(1, 0, {"optim_bits": 8}) == {"optim_bits": 32}
    assert manager.config_for(emb.weight)["optim_bits"] == 32


def test_module_overrides_do_not_keep_modules_alive(manager):
    Embedding(10, 4)
    gc.collect()
    assert manager.module_weight_config_triple == []


def test_errors(manager):
    p = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="needs key and value, or key_value_dict"):
        manager.override_config(p)
    with pytest.raises(ValueError, match="not both"):
        manager.override_config(p, "lr", 1.0, {"lr": 2.0})
    with pytest.raises(TypeError, match="parameters must be tensors, got str"):
        manager.override_config(["weight"], "lr", 1.0)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got str"):
        manager.register_module_override("layer", "weight", {})
    holder = nn.Module()
    holder.weight = None
    manager.register_module_override(holder, "weight", {"optim_bits": 32})
    with pytest.raises(TypeError, match="Module.weight must be a tensor to take an override, got NoneType"):
        manager.check_overrides([{"params": []}])
