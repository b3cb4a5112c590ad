"""vLLM on a GPU node: ``vllm serve <model>``, ready when ``/health`` answers, load from ``/metrics``."""

from __future__ import annotations

import os
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
    argv += ["--served-model-name", model_id]
    if settings.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if settings.max_model_len:
        argv += ["--max-model-len", str(settings.max_model_len)]
    argv += settings.args
    env = {**os.environ, **settings.env} if settings.env else None  # None: the worker's own
    return OpenAIServerEngine(
        f"http://127.0.0.1:{port}",
        model_id,
        health_path="/health",
        metrics_path="/metrics",
        process=ServerProcess(argv, env),
    )
