"""igd: an inbound port-mapping gateway (UPnP IGD, NAT-PMP, PCP) and client library."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One version, pyproject.toml's, as installed; `igd-server --version` and `igd --version`.
    __version__ = version("igd")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
