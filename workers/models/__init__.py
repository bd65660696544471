"""Model adapters, found by the provider part of a model name (`sim`, `openai/<name>`, …)."""

from __future__ import annotations

from collections.abc import Callable

from app.settings import Settings
from workers.models.anthropic import AnthropicAdapter
from workers.models.base import GenerationContext, ModelAdapter, ProviderError
from workers.models.openai import OpenAIAdapter
from workers.models.sim import SimModel

__all__ = ["Adapters", "GenerationContext", "ModelAdapter", "ProviderError"]

AdapterFactory = Callable[[Settings | None], ModelAdapter]

# Provider name -> factory of its adapter. One adapter per provider and worker serves
# every model of that provider, so they share one HTTP connection pool.
PROVIDERS: dict[str, AdapterFactory] = {
    "sim": lambda _settings: SimModel(),
    "openai": lambda settings: OpenAIAdapter(max_streams=_max_streams(settings)),
    "anthropic": lambda settings: AnthropicAdapter(max_streams=_max_streams(settings)),
}


def _max_streams(settings: Settings | None) -> int:
    return (settings or Settings()).provider_concurrency


class Adapters:
    """The adapters of one worker, made on first use and closed with `close()`."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._made: dict[str, ModelAdapter] = {}

    def __call__(self, model: str) -> ModelAdapter:
        """The adapter that streams `model`; ProviderError("model_unavailable") if none does."""
        provider = model.split("/", 1)[0]
        adapter = self._made.get(provider)
        if adapter is None:
            factory = PROVIDERS.get(provider)
            if factory is None:
                raise ProviderError(
                    "model_unavailable",
                    f"this worker has no adapter for {model!r}; "
                    f"it runs: {', '.join(sorted(PROVIDERS))}",
                )
            adapter = self._made[provider] = factory(self._settings)
        return adapter

    async def close(self) -> None:
        made, self._made = self._made, {}
        for adapter in made.values():
            close = getattr(adapter, "close", None)
            if close is not None:
                await close()
