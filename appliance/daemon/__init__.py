"""Running the daemon: the server, its service manager, and how the CLI and TUI reach it."""
