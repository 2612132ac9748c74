"""Server side: settings, the ServerApp, progress display and the run directory."""
