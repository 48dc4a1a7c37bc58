"""``GlobalOptimManager``: per-parameter optimizer settings, as bitsandbytes keeps them.

Layers register overrides (``Embedding`` asks for 32-bit optimizer state on its weight);
an optimizer asks :meth:`GlobalOptimManager.get_config` for the settings of each of its
parameters after calling :meth:`GlobalOptimManager.check_overrides` with its groups.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["GlobalOptimManager"]


class GlobalOptimManager:
    """The process-wide registry of optimizer overrides (a singleton: use :meth:`get_instance`).

    Attributes:
        pid2config: ``id(parameter) -> dict`` of overridden settings.
        index2config: ``(group index, parameter index) -> dict``, filled by
            :meth:`register_parameters` / :meth:`check_overrides`.
        uses_config_override: True once :meth:`override_config` was called.
    """

    _instance: GlobalOptimManager | None = None

    def __init__(self) -> None:
        raise RuntimeError("GlobalOptimManager is a singleton: call GlobalOptimManager.get_instance()")

    def initialize(self) -> None:
        """Forget every registration and override."""
        self.pid2config: dict[int, dict[str, Any]] = {}
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}
        self.optimizer: Any = None
        self.uses_config_override = False
        # Modules are held weakly: registering an override must not keep a layer alive.
        self._module_overrides: list[tuple[weakref.ref, str, dict[str, Any]]] = []

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        """The one manager of this process (created and initialised on first use)."""
        if cls._instance is None:
            instance = cls.__new__(cls)
            instance.initialize()
            cls._instance = instance
        return cls._instance

    @property
    def module_weight_config_triple(self) -> list[tuple[torch.nn.Module, str, dict[str, Any]]]:
        """``(module, parameter name, config)`` of every live module override."""
        live = [(ref(), name, config) for ref, name, config in self._module_overrides]
        return [(module, name, config) for module, name, config in live if module is not None]

    def register_parameters(self, params: Iterable[Any]) -> None:
        """Record the (group, index) position of parameters that have overrides.

        Args:
            params: parameters, or optimizer-style parameter groups (dicts with "params").
        """
        param_groups = list(params)
        if not param_groups:
            return
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for group_index, group in enumerate(param_groups):
            for p_index, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(group_index, p_index)] = self.pid2config[id(p)]

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: dict[str, Any] | None = None,
    ) -> None:
        """Override optimizer settings for some parameters.

        Args:
            parameters: a parameter or an iterable of them.
            key, value: one setting (e.g. ``"optim_bits", 32``).
            key_value_dict: several settings; give either this or key/value.
        """
        if key is not None and key_value_dict is not None:
            raise ValueError(f"give key/value or key_value_dict, not both; got key={key!r} and {key_value_dict!r}")
        if key is not None:
            key_value_dict = {key: value}
        if key_value_dict is None:
            raise ValueError("override_config needs key and value, or key_value_dict")
        self.uses_config_override = True
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
            self.pid2config.setdefault(id(p), {}).update(key_value_dict)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict[str, Any]) -> None:
        """Ask for ``config`` on ``getattr(module, param_name)``, resolved when an
        optimizer calls :meth:`check_overrides` (the parameter may be replaced before)."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self._module_overrides = [entry for entry in self._module_overrides if entry[0]() is not None]
        self._module_overrides.append((weakref.ref(module), param_name, dict(config)))

    def check_overrides(self, param_groups: Iterable[dict[str, Any]]) -> None:
        """Resolve module overrides against an optimizer's parameter groups."""
        groups = list(param_groups)
        positions = {id(p): (g, i) for g, group in enumerate(groups) for i, p in enumerate(group["params"])}
        for module, name, config in self.module_weight_config_triple:
            param = getattr(module, name, None)
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    f"{type(module).__name__}.{name} must be a tensor to take an override, got {type(param).__name__}"
                )
            position = positions.get(id(param))
            if position is not None:
                self.pid2config[id(param)] = config
                self.index2config[position] = config

    def get_config(self, group_index: int, param_index: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """The settings for one parameter: ``base`` (the optimizer's group settings)
        updated with any override registered for that position."""
        config = dict(base or {})
        config.update(self.index2config.get((group_index, param_index), {}))
        return config

    def config_for(self, param: torch.Tensor, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`get_config` looked up by the parameter itself."""
        config = dict(base or {})
        config.update(self.pid2config.get(id(param), {}))
        return config
