"""The taskdelta Python SDK and command line. Never imports torch."""
