"""gpt2scratch: build, train and use GPT-2 models from scratch.

`GPT` is imported on first use, so that `import gpt2scratch` (and data preparation workers) do not pay for torch.
"""

from importlib.metadata import PackageNotFoundError, version

from gpt2scratch.config import Config, GPTConfig, TrainingConfig

try:
    __version__ = version("gpt2scratch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["GPT", "Config", "GPTConfig", "TrainingConfig", "__version__"]


def __getattr__(name: str):
    if name == "GPT":
        from gpt2scratch.models import GPT

        return GPT
    raise AttributeError(f"module 'gpt2scratch' has no attribute {name!r}")
