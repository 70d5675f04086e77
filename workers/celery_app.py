"""The Celery app. With no STUDIO_BROKER_URL it uses an embedded broker that needs
no server (kombu's filesystem transport in the data dir, for one machine); with
redis://... any number of workers on other machines share the queue.

Results go to the SQL database, not to a Celery result backend."""

from __future__ import annotations

from celery import Celery

from .settings import Settings, load_settings


def broker_options(settings: Settings) -> tuple[str, dict]:
    if settings.embedded_broker:
        settings.ensure_dirs()
        q = str(settings.broker_dir / "queue")
        return "filesystem://", {"data_folder_in": q, "data_folder_out": q,
                                 "processed_folder": str(settings.broker_dir / "processed"),
                                 "control_folder": str(settings.broker_dir / "control"),
                                 "store_processed": False, "polling_interval": 0.5}
    # A task's message is redelivered if its worker dies before acking (acks_late);
    # the run-id keyed claim makes that redelivery harmless.
    return settings.broker_url, {"visibility_timeout": 6 * 3600, "queue_order_strategy": "priority",
                                 "priority_steps": list(range(10))}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    url, opts = broker_options(settings)
    app = Celery("peft_studio", include=["workers.tasks", "workers.benchmark_task"])
    app.conf.update(
        broker_url=url,
        broker_transport_options=opts,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_default_priority=5,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=not settings.embedded_broker,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf.studio_settings = settings
    return app


app = make_celery()
