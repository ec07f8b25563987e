"""Small helpers for training loops other than ghlc's own (each imports its library lazily)."""
