"""Writing a run's outputs safely: folders and files that a crash never leaves looking whole."""
