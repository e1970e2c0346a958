"""The event feed: every subscriber gets every event it asked for, in order, in a bounded
queue that drops its oldest events (and counts them) rather than make a publisher wait."""

import asyncio
from ipaddress import IPv4Address

import pytest

from igd.events import DatagramDropped, DropReason, ExternalAddressChanged
from igd.server.feed import EventFeed

CLIENT = IPv4Address("192.168.1.10")


def dropped(n: int) -> DatagramDropped:
    return DatagramDropped(IPv4Address(int(CLIENT) + n), DropReason.RATE_LIMIT)


def test_every_subscriber_gets_what_it_asked_for_in_order() -> None:
    feed = EventFeed()
    everything = feed.subscribe("all")
    addresses = feed.subscribe("addresses", kinds=(ExternalAddressChanged,))
    moved = ExternalAddressChanged(None, IPv4Address("203.0.113.1"))
    feed.publish(dropped(0))
    feed.publish(moved)
    feed.publish(dropped(1))
    assert everything.take() == ([dropped(0), moved, dropped(1)], 0)
    assert addresses.take() == ([moved], 0)
    assert everything.take() == ([], 0)


def test_a_slow_subscriber_loses_its_oldest_events_and_is_told() -> None:
    feed = EventFeed()
    slow = feed.subscribe("slow", bound=4)
    fast = feed.subscribe("fast", bound=100)
    for n in range(7):
        feed.publish(dropped(n))
    assert slow.take() == ([dropped(n) for n in range(3, 7)], 3)
    assert slow.lost == 3
    assert fast.take() == ([dropped(n) for n in range(7)], 0)
    feed.publish(dropped(7))
    assert slow.take() == ([dropped(7)], 0)  # the loss is reported once


def test_a_closed_subscriber_gets_nothing_more() -> None:
    feed = EventFeed()
    gone = feed.subscribe("gone")
    gone.close()
    feed.publish(dropped(0))
    assert gone.take() == ([], 0) and feed.subscribers == ()
    with pytest.raises(ValueError):
        feed.subscribe("empty", bound=0)


async def test_next_waits_for_an_event() -> None:
    feed = EventFeed()
    waiting = feed.subscribe("waiting")
    task = asyncio.create_task(waiting.next())
    await asyncio.sleep(0)
    assert not task.done()
    feed.publish(dropped(0))
    assert await asyncio.wait_for(task, 1) == ([dropped(0)], 0)
