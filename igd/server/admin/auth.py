"""The admin listener's guards: password hashes, sessions with their CSRF tokens, the login
rate limit and the Host header check (DNS rebinding)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from ipaddress import IPv4Address

# scrypt cost (RFC 7914 §2): N=2^14, r=8, p=1 takes ~50 ms and 16 MiB here, which is what
# makes each guess at a stolen hash expensive; the login rate limit bounds online guessing.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
HASH_SCHEME = "scrypt"

SESSION_LIFETIME = 12 * 3600.0  # seconds a session lives after its last use
MAX_SESSIONS = 64  # sessions kept; the least recently used goes first
LOGIN_WINDOW = 60.0  # seconds over which failed logins are counted
FAILURES_PER_CLIENT = 5  # failed logins per client address per window
FAILURES_TOTAL = 20  # failed logins from everyone per window (guessing from many addresses)
MAX_LOGIN_CLIENTS = 256  # client addresses whose failures are remembered


class HashFormatError(ValueError):
    """A password_hash that is not `scrypt$N$r$p$salt$hash`."""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` (base64) for the configuration's [admin] password_hash."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM
    )
    encode = base64.b64encode
    return "$".join(
        (HASH_SCHEME, str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), encode(salt).decode(),
         encode(digest).decode())
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A parsed password hash."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse `scrypt$N$r$p$salt$hash`; HashFormatError says what is wrong."""
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != HASH_SCHEME:
            raise HashFormatError("want scrypt$N$r$p$salt$hash (igd-server admin hash-password)")
        try:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt = base64.b64decode(parts[4], validate=True)
            digest = base64.b64decode(parts[5], validate=True)
        except ValueError:
            raise HashFormatError("scrypt parameters or base64 fields are malformed") from None
        if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or len(digest) < 16:
            raise HashFormatError("scrypt parameters out of range")
        if 128 * r * n > SCRYPT_MAXMEM:
            raise HashFormatError("scrypt parameters need more memory than allowed")
        return cls(n, r, p, salt, digest)

    def verify(self, password: str) -> bool:
        """Whether the password matches (constant-time comparison)."""
        digest = hashlib.scrypt(
            password.encode(), salt=self.salt, n=self.n, r=self.r, p=self.p,
            maxmem=SCRYPT_MAXMEM, dklen=len(self.digest),
        )  # fmt: skip
        return hmac.compare_digest(digest, self.digest)


@dataclass(slots=True)
class Session:
    """One logged-in browser: its CSRF token and when it lapses."""

    csrf: str
    expires: float


class Sessions:
    """Session tokens (the cookie) and their CSRF tokens, bounded by MAX_SESSIONS."""

    def __init__(self, lifetime: float = SESSION_LIFETIME, bound: int = MAX_SESSIONS) -> None:
        self.lifetime = lifetime
        self.bound = bound
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, *, now: float) -> tuple[str, Session]:
        """A new session token and its session (evicting the least recently used)."""
        while len(self._sessions) >= self.bound:
            self._sessions.popitem(last=False)
        token = secrets.token_urlsafe(32)
        session = self._sessions[token] = Session(secrets.token_urlsafe(32), now + self.lifetime)
        return token, session

    def get(self, token: str | None, *, now: float) -> Session | None:
        """The live session of a cookie value, its lifetime extended; None if there is none."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        if session.expires <= now:
            del self._sessions[token]
            return None
        session.expires = now + self.lifetime
        self._sessions.move_to_end(token)
        return session

    def end(self, token: str | None) -> None:
        """Log a session out."""
        if token:
            self._sessions.pop(token, None)

    def __len__(self) -> int:
        return len(self._sessions)


def csrf_matches(session: Session, offered: str | None) -> bool:
    """Whether a request's CSRF token is its session's (constant-time)."""
    return offered is not None and hmac.compare_digest(session.csrf.encode(), offered.encode())


@dataclass(slots=True)
class LoginLimiter:
    """Failed logins per client address and in total over a sliding window."""

    window: float = LOGIN_WINDOW
    per_client: int = FAILURES_PER_CLIENT
    total: int = FAILURES_TOTAL
    bound: int = MAX_LOGIN_CLIENTS
    _clients: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)
    _all: deque[float] = field(default_factory=deque)

    def retry_after(self, client: str, *, now: float) -> float:
        """Seconds until this client may try again (0: now)."""
        self._forget(now)
        waits = [0.0]
        mine = self._clients.get(client)
        if mine is not None and len(mine) >= self.per_client:
            waits.append(mine[0] + self.window - now)
        if len(self._all) >= self.total:
            waits.append(self._all[0] + self.window - now)
        return max(waits)

    def failed(self, client: str, *, now: float) -> None:
        """Count a failed login."""
        mine = self._clients.get(client)
        if mine is None:
            while len(self._clients) >= self.bound:
                self._clients.popitem(last=False)
            mine = self._clients[client] = deque()
        mine.append(now)
        self._all.append(now)

    def _forget(self, now: float) -> None:
        horizon = now - self.window
        while self._all and self._all[0] <= horizon:
            self._all.popleft()
        for client in [c for c, times in self._clients.items() if times[-1] <= horizon]:
            del self._clients[client]
        for times in self._clients.values():
            while times and times[0] <= horizon:
                times.popleft()


def allowed_hosts(address: IPv4Address, port: int, names: tuple[str, ...]) -> frozenset[str]:
    """Host header values the console answers to: its address and configured names, with and
    without the port (a rebinding page's Host is its own name, never one of these)."""
    hosts = {str(address), *names}
    if address.is_loopback:
        hosts.add("localhost")
    return frozenset(hosts | {f"{host}:{port}" for host in hosts})
