"""The classic compressors (magnitude pruning, Network Slimming, Torch-Pruning, KD students)."""
