"""Training: the Lightning module, safetensors checkpoints, run folders and resume."""
