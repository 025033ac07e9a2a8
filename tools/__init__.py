"""Developer tools for the repository itself (not part of the pipeline)."""
