"""The queue: Celery app and tasks that turn a queued run into engine calls, and
the small database layer they share with the studio (no web imports here)."""
