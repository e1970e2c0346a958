"""Pure codecs: bytes in, frozen dataclasses out, and back. No sockets, clocks or asyncio."""
