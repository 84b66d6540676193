"""Prometheus metrics of `mailer serve`, read from the database at each scrape.

Everything is a count over the store, so every `mailer serve` sharing a database reports the
same numbers, whichever process sent: deliveries by status, the queue depth (pending rows), runs
by status, addresses suppressed for bouncing, consent events (subscriptions, confirmations,
unsubscriptions…), list members by status and the scheduler's last heartbeat. No label holds
an address or anything else about a person.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import ColumnElement, Connection, func, select

from .heartbeat import SCHEDULER
from .store import DeliveryStatus, RunStatus, Store
from .store.ops_tables import heartbeats
from .store.subscriber_tables import ConsentEvent, MemberStatus, consent_events, memberships
from .store.tables import deliveries, runs, suppressions


class StoreCollector:
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        with self.store.engine.connect() as conn:
            by_status = _counts(conn, deliveries.c.status)
            run_status = _counts(conn, runs.c.status)
            bounced = _counts(conn, suppressions.c.reason,
                              suppressions.c.reason.like("%bounce%"))
            events = _counts(conn, consent_events.c.event)
            members = conn.execute(
                select(memberships.c.list_name, memberships.c.status, func.count())
                .group_by(memberships.c.list_name, memberships.c.status)).all()
            beat = conn.execute(select(heartbeats.c.beat_at)
                                .where(heartbeats.c.name == SCHEDULER)).scalar()

        g = GaugeMetricFamily("mailer_deliveries", "Ledger rows (one per recipient per run) "
                              "by status", labels=["status"])
        for status in DeliveryStatus:
            g.add_metric([status.value], by_status.get(status.value, 0))
        yield g
        yield GaugeMetricFamily("mailer_queue_depth", "Ledger rows waiting to be sent (pending)",
                                value=by_status.get(DeliveryStatus.PENDING.value, 0))
        g = GaugeMetricFamily("mailer_runs", "Runs (campaign occurrences) by status",
                              labels=["status"])
        for run_status_value in RunStatus:
            g.add_metric([run_status_value.value], run_status.get(run_status_value.value, 0))
        yield g
        g = GaugeMetricFamily("mailer_bounces", "Addresses suppressed because mail to them "
                              "bounced, by reason", labels=["reason"])
        for reason in sorted(set(bounced) | {"hard_bounce"}):
            g.add_metric([reason], bounced.get(reason, 0))
        yield g
        c = CounterMetricFamily("mailer_consent_events", "Consent events recorded, by kind",
                                labels=["event"])
        for event in ConsentEvent:
            c.add_metric([event.value], events.get(event.value, 0))
        yield c
        yield CounterMetricFamily("mailer_subscriptions", "Subscriptions confirmed (double "
                                  "opt-in completed)",
                                  value=events.get(ConsentEvent.CONFIRMED.value, 0))
        yield CounterMetricFamily("mailer_unsubscriptions", "Unsubscriptions",
                                  value=events.get(ConsentEvent.UNSUBSCRIBED.value, 0))
        g = GaugeMetricFamily("mailer_list_members", "Members of the managed lists by status",
                              labels=["list", "status"])
        seen = {(row[0], row[1]): row[2] for row in members}
        for list_name in sorted({name for name, _ in seen}):
            for member in MemberStatus:
                g.add_metric([list_name, member.value], seen.get((list_name, member.value), 0))
        yield g
        if beat is not None:
            yield GaugeMetricFamily("mailer_scheduler_heartbeat_timestamp_seconds",
                                    "When the leading `mailer run` last said it was alive "
                                    "(Unix time)", value=float(beat))


def _counts(conn: Connection, column: ColumnElement[Any],
            where: ColumnElement[bool] | None = None) -> dict[str, int]:
    query = select(column, func.count()).group_by(column)
    if where is not None:
        query = query.where(where)
    return {str(key): int(n) for key, n in conn.execute(query)}


def render(store: Store) -> bytes:
    """The exposition text (a fresh registry per scrape: nothing global, nothing cached)."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    return generate_latest(registry)
