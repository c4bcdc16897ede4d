"""Every Celery setting, read from the environment in one place
(docs/architecture.md#configuration).

The mailbox does not trust Celery with correctness: a message is only a wake-up, the claim
and its token decide. So messages are acked on receipt (no acks_late), a worker lost
mid-phase does not requeue its message (the lease expires and the sweep reclaims the dispatch
with attempt_count + 1, so a crash loop ends in the dead letter), and no result backend is
needed (a chain passes each phase's result in the next message).
"""

from __future__ import annotations

import os

from kombu.entity import Exchange, Queue

from mailbox.settings import Settings
from tasks.priorities import AMQP_PHASE_PRIORITY, is_amqp

_settings = Settings.from_env()
NAMESPACE = _settings.namespace
QUEUE = NAMESPACE

if _settings.broker_url is None and (_settings.redis_url or "").split("://", 1)[0].lower() in (
        "redis+cluster", "rediss+cluster"):
    # kombu's Redis transport needs one server: the coordination cluster cannot carry the
    # queues (docs/redis-cluster.md#configuration).
    raise ValueError("MAILBOX_REDIS_URL names a Redis Cluster, which cannot be Celery's "
                     "broker: set CELERY_BROKER_URL to a plain Redis (redis://…) or RabbitMQ "
                     "(amqp://…)")
broker_url = _settings.broker_url or "redis://127.0.0.1:6379/0"
broker_connection_retry_on_startup = True
# kombu's Redis transport, minus the way one malformed queue entry stops a worker (tasks/app.py).
if broker_url.split("://", 1)[0] in ("redis", "rediss"):
    broker_transport = "tasks.app:CheckedRedisTransport"
if is_amqp(broker_url):
    # A priority queue, so that phase messages go before wake-ups as they do on Redis (see
    # tasks/runtime.py). RabbitMQ refuses to redeclare an existing queue with other
    # arguments: a queue made by an older version must be deleted once.
    task_queues = (Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE,  # type: ignore[no-untyped-call]
                         queue_arguments={"x-max-priority": AMQP_PHASE_PRIORITY}),)
    task_default_priority = AMQP_PHASE_PRIORITY
# Above the longest phase and any wake-up countdown we publish (those stay under 5 minutes),
# so Redis never redelivers a message that is still legitimately held.
broker_transport_options = {
    "visibility_timeout": int(os.environ.get("MAILBOX_VISIBILITY_TIMEOUT_S", "7200")),
    "socket_timeout": 5,
    "socket_connect_timeout": 5,
}
# A broker that is down must not hang dispatch.delay(): fail fast, the row is already durable.
task_publish_retry = True
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                             "interval_max": 0.5}

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

task_acks_late = False
task_reject_on_worker_lost = False
worker_prefetch_multiplier = 1
worker_hijack_root_logger = False
worker_send_task_events = os.environ.get("MAILBOX_WORKER_EVENTS", "") == "1"
task_send_sent_event = worker_send_task_events

task_default_queue = QUEUE
task_routes = {"mailbox.*": {"queue": QUEUE}}

beat_schedule = {
    "mailbox-sweep": {"task": "mailbox.sweep", "schedule": float(_settings.sweep_interval_s)},
    "mailbox-gc": {"task": "mailbox.gc", "schedule": float(_settings.gc_interval_s)},
}
beat_schedule_filename = os.environ.get("MAILBOX_BEAT_SCHEDULE", "var/celerybeat-schedule")
