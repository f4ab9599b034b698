"""Policies: VLM backbones (adapters), the action token, heads and transfer strategies."""
