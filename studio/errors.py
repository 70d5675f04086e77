"""The studio's refusals, below every studio module that raises them (service, checks,
artifacts, gguf) so none of them has to import another for its exceptions."""

from __future__ import annotations


class SubmitError(ValueError):
    """A run that cannot be queued; the message names the field."""


class NotFound(LookupError):
    pass


class InternalError(SubmitError):
    """A run that cannot be queued because of a fault of ours, not of its config (an
    estimator or structure check that broke): the API answers 500 with this message,
    never a silently skipped check. A SubmitError, so the CLI and UI show it as one."""
