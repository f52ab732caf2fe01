"""gpt2scratch: build, train and use GPT-2 models from scratch."""

from importlib.metadata import PackageNotFoundError, version

from gpt2scratch.config import Config, GPTConfig, TrainingConfig
from gpt2scratch.models import GPT

try:
    __version__ = version("gpt2scratch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["GPT", "Config", "GPTConfig", "TrainingConfig", "__version__"]
