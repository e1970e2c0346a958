"""When to retransmit, when to renew, and whether a gateway lost its state: pure functions
of time passed in (`now`, monotonic seconds) and of random draws passed in, so tests
never sleep."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# RFC 6886 §3.1: 250 ms, doubling, nine attempts in all.
NATPMP_FIRST_WAIT = 0.25
NATPMP_ATTEMPTS = 9
# RFC 6887 §8.1.1: IRT 3 s, MRT 1024 s, RAND in [-0.1, +0.1] drawn afresh each time.
PCP_IRT = 3.0
PCP_MRT = 1024.0
# RFC 6887 §11.2.1: after a failed renewal, retry no sooner than 4 s later.
MIN_RENEW_GAP = 4.0
# RFC 6887 §15 / §8.3: a client treats absurd lifetimes as 24 h.
MAX_LIFETIME = 24 * 3600


def natpmp_waits(attempts: int = NATPMP_ATTEMPTS, first: float = NATPMP_FIRST_WAIT) -> list[float]:
    """How long to wait for an answer after each NAT-PMP send (RFC 6886 §3.1)."""
    return [first * 2**i for i in range(attempts)]


def pcp_waits(rand: Callable[[], float], *, irt: float = PCP_IRT) -> Iterator[float]:
    """RFC 6887 §8.1.1 retransmission timeouts; `rand()` returns a float in [0, 1)."""
    wait = (1 + (rand() * 0.2 - 0.1)) * irt
    while True:
        yield wait
        wait = (1 + (rand() * 0.2 - 0.1)) * min(2 * wait, PCP_MRT)


def clamp_lifetime(lifetime: int) -> int:
    """RFC 6887 §15: treat a granted lifetime over 24 h as 24 h when scheduling."""
    return min(lifetime, MAX_LIFETIME)


def renew_at(
    granted_at: float, lifetime: int, attempt: int, *, now: float, jitter: float = 0.0
) -> float | None:
    """When to send renewal `attempt` (0 = first) of a lease granted at `granted_at`.

    RFC 6887 §11.2.1: the first renewal at a random point of [1/2, 5/8] of the lifetime
    (`jitter` in [0, 1) picks it), then after each failure at 3/4, 7/8, ... of it, never
    sooner than 4 s after `now`; for the few-second leases of labs the gap shrinks to an
    eighth of the lifetime so that a retry still fits. None once the lease has run out.
    """
    lifetime = clamp_lifetime(lifetime)
    expires = granted_at + lifetime
    if now >= expires:
        return None
    if attempt == 0:
        fraction = 0.5 + jitter / 8
    else:
        fraction = 1 - 2.0 ** -(attempt + 1)
    gap = min(MIN_RENEW_GAP, lifetime / 8)
    when = max(granted_at + lifetime * fraction, now + gap if attempt else now)
    return when if when < expires else None


class EpochRule(enum.Enum):
    """Which test tells a restarted gateway from a live one."""

    PCP = "pcp"
    """RFC 6887 §8.5: two-sided, with 1/16 slack each way."""
    NATPMP = "natpmp"
    """RFC 6886 §3.6: the server clock must have run at least 7/8 as fast as ours."""


@dataclass(slots=True)
class EpochTracker:
    """Remembers the last epoch a gateway sent and when; `observe` says if the new one fits."""

    rule: EpochRule = EpochRule.PCP
    server: int | None = None
    client: float | None = None

    def observe(self, epoch: int, *, now: float) -> bool:
        """True if `epoch`, received at `now`, is consistent with the previous one.

        False means the gateway lost its mappings (restart, or a new external address):
        the caller must re-create every mapping it holds there (RFC 6887 §8.5, §16.3.1;
        RFC 6886 §3.7). The first observation is always valid; every one is stored.
        """
        prev_server, prev_client = self.server, self.client
        self.server, self.client = epoch, now
        if prev_server is None or prev_client is None:
            return True
        client_delta = now - prev_client
        if self.rule is EpochRule.NATPMP:
            expected = prev_server + client_delta * 7 / 8
            return epoch >= expected - 2
        if epoch < prev_server - 1:
            return False
        server_delta = epoch - prev_server
        if client_delta + 2 < server_delta - server_delta // 16:
            return False
        return not server_delta + 2 < client_delta - client_delta / 16
