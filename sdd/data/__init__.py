"""Raw data: the one loader for Hub and local sources, and the demo corpus shipped in the package."""
