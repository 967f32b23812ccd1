"""Error types of the engine.

Every error a user can trigger carries a message that names the problem and the fix.
Modules and the command line show ``str(error)`` as it is.
"""


class MMRegError(Exception):
    """Base class of all errors raised on purpose by mmreg."""


class InputError(MMRegError, ValueError):
    """An input image, label map or parameter cannot be used (the message says why and what to do)."""


class WeightsError(MMRegError):
    """A model's weights or model card are missing, corrupted or do not match the method."""


class CancelledError(MMRegError):
    """The user cancelled a running registration; inputs are untouched and nothing was written."""
