"""The gateway daemon: thin asyncio adapters around the core, plus its command line."""
