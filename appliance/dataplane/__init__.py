"""The multi-process data plane ([server] workers = N > 1): N worker processes take
the clients' connections on the daemon's one listening socket and do the HTTP
work (client and engine sides); the daemon stays the one authority that decides
(keys, routes, budgets, replicas, audit). See docs/architecture.md."""
