"""How a child network is scored: KD training as Ray tasks, the reward cache, early stopping."""
