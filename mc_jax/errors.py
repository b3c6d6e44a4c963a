"""Exceptions with messages that name the problem and the fix."""


class McJaxError(Exception):
    """Base class for mc_jax errors meant to be shown to a user."""


class ConfigError(McJaxError, ValueError):
    """A configuration that cannot work (e.g. a budget that cannot hold the history)."""


class CorruptFileError(McJaxError):
    """A weights, tree or checkpoint file that is truncated, corrupt or mismatched."""


class MissingResourceError(McJaxError, FileNotFoundError):
    """A wheel, corpus or cache entry that is not there; the message says how to get it."""


class CapacityError(McJaxError, ValueError):
    """An input that exceeds a fixed capacity (KV cache, tree capacity)."""


class TokenError(McJaxError, ValueError):
    """Token ids of the wrong dtype or outside the vocabulary."""


class InputError(McJaxError, ValueError):
    """A user input (file, prompt) that cannot be used: empty, binary, unreadable."""
