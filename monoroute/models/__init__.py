from monoroute.models.config import GPTConfig
from monoroute.models.gpt import GPT

__all__ = ["GPT", "GPTConfig"]
