"""The event feed: every event the service publishes goes to every subscriber's own queue.

Publishing never waits: each subscriber's queue is bounded, and one that falls behind loses
its oldest events and is told how many (`take` returns the count), so a slow consumer can
re-read the state it needs instead of slowing a request down.
"""

from __future__ import annotations

import asyncio
from collections import deque

from igd.events import Event

# Events one subscriber may have waiting before its oldest are dropped.
DEFAULT_QUEUE_BOUND = 1024


class Subscriber:
    """One consumer's bounded queue of events."""

    def __init__(
        self, feed: EventFeed, name: str, bound: int, kinds: tuple[type[Event], ...] | None
    ) -> None:
        if bound < 1:
            raise ValueError("a subscriber's queue holds at least one event")
        self.name = name
        self.bound = bound
        self.kinds = kinds
        """The event types this subscriber receives (None: all of them)."""
        self.lost = 0
        """Events dropped from this queue since it was made (oldest first)."""
        self._feed = feed
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._reported = 0

    def put(self, event: Event) -> None:
        """Queue an event, dropping the oldest when the queue is full."""
        if len(self._queue) >= self.bound:
            self._queue.popleft()
            self.lost += 1
        self._queue.append(event)
        self._ready.set()

    def take(self) -> tuple[list[Event], int]:
        """Everything queued, and how many events were lost since the last take."""
        events = list(self._queue)
        self._queue.clear()
        self._ready.clear()
        lost, self._reported = self.lost - self._reported, self.lost
        return events, lost

    async def next(self) -> tuple[list[Event], int]:
        """Wait until something is queued, then take it."""
        while not self._queue and self.lost == self._reported:
            self._ready.clear()
            await self._ready.wait()
        return self.take()

    def close(self) -> None:
        """Stop receiving events."""
        self._feed.unsubscribe(self)


class EventFeed:
    """Fans published events out to any number of subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(
        self,
        name: str,
        bound: int = DEFAULT_QUEUE_BOUND,
        kinds: tuple[type[Event], ...] | None = None,
    ) -> Subscriber:
        """A new subscriber, receiving every event (of these kinds) published from now on."""
        subscriber = Subscriber(self, name, bound, kinds)
        self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def publish(self, event: Event) -> None:
        """Give an event to every subscriber; never blocks."""
        for subscriber in self._subscribers:
            if subscriber.kinds is None or isinstance(event, subscriber.kinds):
                subscriber.put(event)

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        return tuple(self._subscribers)
