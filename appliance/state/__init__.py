"""The daemon's own durable state: its SQLite database, migrations, the operator's decisions, one daemon per state dir."""
