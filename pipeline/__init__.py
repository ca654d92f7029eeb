"""n2n orchestration: data, child training, search, tracking and the command line."""
