"""What a run is: the typed config and its presets, the run flags that set it, the exit codes."""
