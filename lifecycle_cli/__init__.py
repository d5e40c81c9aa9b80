"""llmcycle: the whole life of a language model in one command-line tool."""

__version__ = "0.1.0"
__all__ = ["LLM", "__version__"]


def __getattr__(name: str):
    # `LLM` pulls in torch; resolve it lazily so `llmcycle --help` stays fast.
    if name == "LLM":
        from lifecycle_cli.api import LLM

        return LLM
    raise AttributeError(f"module 'lifecycle_cli' has no attribute {name!r}")
