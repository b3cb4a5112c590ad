"""vLLM on a GPU node: ``vllm serve <model>``, ready when ``/health`` answers, load from ``/metrics``."""

from __future__ import annotations

import shutil
import sys

from services.worker.engines.openai_server import OpenAIServerEngine, ServerProcess, free_port
from shared import config as cfg


def vllm_engine(model_id: str, settings: cfg.VllmEngine) -> OpenAIServerEngine:
    port = settings.port or free_port()
    model = settings.model or model_id
    vllm = shutil.which("vllm")
    launcher = [vllm] if vllm else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    argv = [*launcher, "serve", model, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--served-model-name", model_id, *settings.args]
    return OpenAIServerEngine(
        f"http://127.0.0.1:{port}",
        model_id,
        health_path="/health",
        metrics_path="/metrics",
        process=ServerProcess(argv),
    )
