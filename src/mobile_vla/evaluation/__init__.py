"""Evaluation: offline metrics on held-out episodes (closed loop comes with the simulator)."""
