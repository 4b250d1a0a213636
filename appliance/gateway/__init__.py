"""One API request from the front door to its ledger entry: routes, the request's cost, forwarding to a replica or a provider."""
