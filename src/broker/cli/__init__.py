"""Command-line tools: `broker` (run the server, make keys and certificates) and `brokerctl` (admin)."""
