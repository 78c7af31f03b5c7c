"""The configuration error and its one check helper (a leaf module: it imports nothing of megatron, so that
every layer -- config sections, the partition, the optimizer, the command line -- can raise it without
importing the others)."""

__all__ = ["ConfigError", "require"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the flag and how to fix it."""


def require(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)
