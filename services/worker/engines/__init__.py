"""Engines behind one small interface (``base.Engine``); ``make_engine`` picks one from the config."""

from __future__ import annotations

from services.worker.engines.base import Engine
from shared import config as cfg


def make_engine(model: cfg.ModelConfig) -> Engine:
    match model.engine:
        case cfg.SimEngine():
            from services.worker.engines.sim import SimulatedEngine

            return SimulatedEngine(model.engine)
        case cfg.LlamaCppEngine():
            from services.worker.engines.llamacpp import llamacpp_engine

            return llamacpp_engine(model.id, model.engine)
        case cfg.VllmEngine():
            from services.worker.engines.vllm import vllm_engine

            return vllm_engine(model.id, model.engine)
        case cfg.OpenAIServerEngine():
            from services.worker.engines.openai_server import OpenAIServerEngine

            e = model.engine
            return OpenAIServerEngine(
                e.url, e.served_model or model.id, health_path=e.health_path, metrics_path=e.metrics_path
            )
    raise ValueError(f"unknown engine {model.engine!r}")
