"""A thin ctypes binding to libnftables.so.1: run nft commands in-process, text or JSON out."""

from __future__ import annotations

import ctypes
import functools
import json
from typing import Any, Self, cast

from igd.server.backends import BackendError

LIBRARY = "libnftables.so.1"

# From <nftables/libnftables.h>; stable since the library's first release.
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(BackendError):
    """libnftables is unusable or nft refused a command; the message is nft's own text."""


@functools.cache
def _library() -> ctypes.CDLL:
    """Load libnftables once per process and declare the signatures we call."""
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError as exc:
        raise NftError(
            f"cannot load {LIBRARY} ({exc}); install Debian's nftables package (libnftables1)"
        ) from exc
    # Without restype/argtypes ctypes would truncate the context pointer to a C int.
    ctx = ctypes.c_void_p
    lib.nft_ctx_new.restype = ctx
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctx]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctx]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctx]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_get_flags.argtypes = [ctx]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctx, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctx, ctypes.c_char_p]
    return lib


class Nft:
    """One libnftables context. Not thread-safe: create and use it on a single thread."""

    def __init__(self) -> None:
        self._lib = _library()
        ctx = cast(int | None, self._lib.nft_ctx_new(NFT_CTX_DEFAULT))
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        # Buffered output and errors: we return them instead of letting nft print to stdio.
        if self._lib.nft_ctx_buffer_output(ctx) or self._lib.nft_ctx_buffer_error(ctx):
            self.close()
            raise NftError("cannot buffer libnftables output")
        self._text_flags = cast(int, self._lib.nft_ctx_output_get_flags(ctx))

    def run(self, commands: str) -> str:
        """Run commands (one buffer = one kernel transaction) and return nft's text output."""
        return self._run(commands, self._text_flags)

    def run_json(self, commands: str) -> dict[str, Any]:
        """Run commands with JSON output (for listings) and return the decoded document."""
        out = self._run(commands, self._text_flags | NFT_CTX_OUTPUT_JSON)
        if not out.strip():
            return {"nftables": []}
        try:
            doc = json.loads(out)
        except ValueError as exc:
            raise NftError(f"nft printed invalid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise NftError("nft printed JSON that is not an object")
        return cast(dict[str, Any], doc)

    def close(self) -> None:
        """Free the context; idempotent."""
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, commands: str, flags: int) -> str:
        if self._ctx is None:
            raise NftError("nft context is closed")
        if "\0" in commands:
            # C strings end at NUL: the kernel would run a truncated transaction.
            raise NftError("nft commands contain a NUL character")
        lib, ctx = self._lib, self._ctx
        lib.nft_ctx_output_set_flags(ctx, flags)
        rc = cast(int, lib.nft_run_cmd_from_buffer(ctx, commands.encode()))
        # Read both buffers every time: reading rewinds them for the next command.
        out = cast(bytes | None, lib.nft_ctx_get_output_buffer(ctx)) or b""
        err = cast(bytes | None, lib.nft_ctx_get_error_buffer(ctx)) or b""
        if rc != 0:
            message = err.decode(errors="replace").strip() or f"nft failed (return code {rc})"
            raise NftError(message)
        return out.decode(errors="replace")
