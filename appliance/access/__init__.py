"""Who may do what and what they did: API keys and their budgets, the audit log, tenant isolation."""
