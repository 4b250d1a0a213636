"""`appliance tui`: the operator's terminal UI over the daemon's admin API."""
