"""The admin listener (server.py): the web console (console.py, static/) and Prometheus
metrics (metrics.py), with its guards in auth.py and `igd-server admin` in cli.py."""
