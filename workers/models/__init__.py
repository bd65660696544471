"""Model adapters, found by the provider part of a model name (`sim`, `openai/<name>`, …)."""

from __future__ import annotations

from collections.abc import Callable

from app.settings import Settings
from workers.models.base import GenerationContext, ModelAdapter, ProviderError
from workers.models.sim import SimModel

__all__ = ["GenerationContext", "ModelAdapter", "ProviderError", "adapter_for"]

AdapterFactory = Callable[[str, Settings | None], ModelAdapter]

_sim = SimModel()

# Provider name -> factory of its adapter for a model name. The OpenAI-compatible and
# Anthropic adapters register here ("openai": ..., "anthropic": ...).
PROVIDERS: dict[str, AdapterFactory] = {
    "sim": lambda _model, _settings: _sim,
}


def adapter_for(model: str, settings: Settings | None = None) -> ModelAdapter:
    """The adapter that streams `model`; ProviderError("model_unavailable") if none does."""
    provider = model.split("/", 1)[0]
    factory = PROVIDERS.get(provider)
    if factory is None:
        raise ProviderError(
            "model_unavailable",
            f"this worker has no adapter for {model!r}; it runs: {', '.join(sorted(PROVIDERS))}",
        )
    return factory(model, settings)
