"""`gpt2scratch serve`: an OpenAI-compatible completions server with continuous batching, and a web page.

engine.py    the model thread: a continuous batch over the KV cache, a bounded queue
protocol.py  OpenAI's request/answer/stream formats and errors
app.py       the FastAPI app (routes, API key, streaming, disconnects)
"""

from __future__ import annotations

from pathlib import Path

from gpt2scratch.config import Sampling
from gpt2scratch.options import ServeOptions
from gpt2scratch.serve.protocol import Limits


def build_app(
    loaded,
    name: str | None = None,
    max_batch_size: int = ServeOptions.max_batch_size,
    max_queue: int = ServeOptions.max_queue,
    api_key: str | None = None,
):
    """A FastAPI app serving a `loading.LoadedModel` (the engine starts with the app)."""
    from gpt2scratch.generation import decoding_layout
    from gpt2scratch.serve.app import create_app
    from gpt2scratch.serve.engine import Engine

    limits = Limits(
        model=name or model_name(loaded.source),
        context_length=loaded.config.model.context_length,
        vocab_size=loaded.config.model.vocab_size,
        max_token_chars=loaded.tokenizer.max_token_bytes,
        sampling=Sampling.from_training(loaded.config.training),
        extra={"parameters": loaded.model.num_params()},
    )
    engine = Engine(decoding_layout(loaded.model), loaded.tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
    return create_app(engine, limits, api_key)


def require_serving_libraries() -> None:
    """fastapi and uvicorn are the `serve` extra: say how to install them when they are missing, and what failed
    when one is installed but does not import (a dependency of its own missing, say)."""
    import importlib

    missing, broken = [], []
    for name in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(name)
        except ImportError as error:
            if isinstance(error, ModuleNotFoundError) and error.name == name:
                missing.append(name)
            else:
                broken.append(f"{name} ({error})")
    fix = "pip install 'gpt2scratch[serve]' (or pip install -r requirements.txt)"
    if missing:
        raise ValueError(f"serving needs {' and '.join(missing)}, which are not installed: {fix}")
    if broken:
        raise ValueError(f"serving needs fastapi and uvicorn, but {'; '.join(broken)} failed to import: {fix}")


def model_name(source: Path) -> str:
    """A readable id for a model folder: RUN for RUN/ckpt/step_N or RUN/hf, else the folder's name."""
    source = Path(source).resolve()
    if source.name.startswith("step_") and source.parent.name == "ckpt":
        return source.parent.parent.name
    if source.name == "hf" and source.parent.name:
        return source.parent.name
    return source.name
