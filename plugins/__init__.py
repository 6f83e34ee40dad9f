"""Optional parts of the daemon, each started only when configured."""
