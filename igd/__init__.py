"""igd: an inbound port-mapping gateway (UPnP IGD, NAT-PMP, PCP) and client library."""
