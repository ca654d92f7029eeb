"""What a run leaves behind: its run directory, progress lines, MLflow runs and registry."""
