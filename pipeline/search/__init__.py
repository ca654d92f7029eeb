"""The search: each stage a Ray Tune trial running RLlib (or random search) with N2N's policies."""
