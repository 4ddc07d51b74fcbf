"""Exceptions raised by molora.

All derive from :class:`MoLoRAError` (a ``ValueError``), so callers that already catch
``ValueError`` for bad input keep working, and callers that want molora's errors only can
catch the narrower class.
"""

from __future__ import annotations


class MoLoRAError(ValueError):
    """Base class of molora's errors: bad input, named precisely."""


class AdapterError(MoLoRAError):
    """A PEFT adapter cannot be used: wrong type, shapes for another base model, bad values."""


class CheckpointError(MoLoRAError):
    """A molora checkpoint is missing, truncated, corrupt or made for another base model."""


class RoutingError(MoLoRAError):
    """A routing signal (task ids, timesteps, embeddings, attention mask) is missing or malformed."""
