"""The ctypes binding to libnftables, where it can be tested without the kernel."""

from __future__ import annotations

import pytest

from igd.server.backends import BackendError, libnft


def test_missing_libnftables_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libnft, "LIBRARY", "libnftables-absent.so.0")
    libnft._library.cache_clear()
    try:
        with pytest.raises(BackendError, match="install Debian's nftables package"):
            libnft.Nft()
    finally:
        libnft._library.cache_clear()
