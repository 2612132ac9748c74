"""Flower strategies by name (strategies.registry) and the framework-free fusion engine
(strategies.fusion). This package imports flwr only when a Flower strategy is asked
for, so `import strategies.fusion` works without a federation."""

from __future__ import annotations

_REGISTRY_NAMES = {"PROXY_STRATEGIES", "PartitionSampler", "RecordedFedAvg", "RecordedFedProx", "RoundRecord", "build", "names"}


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        from strategies import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'strategies' has no attribute '{name}'")


__all__ = sorted(_REGISTRY_NAMES)
