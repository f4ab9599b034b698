"""Token sequences for decoder-style VLMs: image spans, text, action placeholders, EOS.

Each row is a list of segments, packed with right padding:

    [("ids", [bos, boi]), ("image", 64, True), ("ids", [eoi, *text]), ("action", 1),
     ("ids", [eos])]

``image`` and ``action`` positions hold a placeholder id; the adapter writes the image
features and the learnable action embeddings into the input embeddings at those positions.
An image segment marked invalid (a padded history frame) is kept but masked from attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    image_mask: torch.Tensor  # (B, L) bool: positions that take image features
    action_mask: torch.Tensor  # (B, L) bool: positions that take action embeddings

    def to(self, device: torch.device) -> Packed:
        return Packed(
            *(
                t.to(device)
                for t in (self.input_ids, self.attention_mask, self.image_mask, self.action_mask)
            )
        )


def pack(rows: Sequence[Sequence[tuple[Any, ...]]], pad_id: int, placeholder_id: int) -> Packed:
    ids, att, img, act = [], [], [], []
    for row in rows:
        r_ids: list[int] = []
        r_att: list[int] = []
        r_img: list[bool] = []
        r_act: list[bool] = []
        for seg in row:
            kind = seg[0]
            if kind == "ids":
                n = len(seg[1])
                r_ids += list(seg[1])
                r_att += [1] * n
                r_img += [False] * n
                r_act += [False] * n
            elif kind == "image":
                n, valid = seg[1], seg[2]
                r_ids += [placeholder_id] * n
                r_att += [1 if valid else 0] * n
                r_img += [True] * n
                r_act += [False] * n
            elif kind == "action":
                n = seg[1]
                r_ids += [placeholder_id] * n
                r_att += [1] * n
                r_img += [False] * n
                r_act += [True] * n
            else:  # pragma: no cover - programming error
                raise ValueError(kind)
        ids.append(r_ids)
        att.append(r_att)
        img.append(r_img)
        act.append(r_act)
    length = max(len(r) for r in ids)

    def pad(rows_: list[list[Any]], value: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([r + [value] * (length - len(r)) for r in rows_], dtype=dtype)

    return Packed(
        pad(ids, pad_id, torch.long),
        pad(att, 0, torch.long),
        pad(img, False, torch.bool),
        pad(act, False, torch.bool),
    )


def fill(
    embeds: torch.Tensor, packed: Packed, image_features: torch.Tensor, action_embeds: torch.Tensor
) -> torch.Tensor:
    """Write image features (rows in sequence order) and action embeddings into ``embeds``."""
    out = embeds.clone()
    out[packed.image_mask] = image_features.reshape(-1, embeds.shape[-1]).to(out.dtype)
    b = embeds.shape[0]
    out[packed.action_mask] = action_embeds.to(out.dtype).repeat(b, 1)
    return out


def gather_actions(hidden: torch.Tensor, packed: Packed, n_act: int) -> torch.Tensor:
    return hidden[packed.action_mask].view(hidden.shape[0], n_act, hidden.shape[-1])
