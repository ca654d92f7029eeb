"""The whole ``n2n run`` job: teacher, removal and shrinkage searches, fine-tuning, summary."""
