"""Lightning's checkpoint I/O over :mod:`mobile_vla.training.checkpoint` (the only module of
the checkpoint code that imports Lightning; reading a run does not need it)."""

from __future__ import annotations

import shutil
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

from mobile_vla.training.checkpoint import load_folder, save_folder


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through :func:`save_folder` / :func:`load_folder`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        save_folder(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_folder(path)

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)
