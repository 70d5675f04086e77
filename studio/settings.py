"""Studio settings: the same environment settings the workers read (see workers.settings)."""

from workers.settings import Settings, load_settings, redact_url  # noqa: F401
