"""Every report's rendering: rich tables and lines on stderr, one JSON object on stdout."""
