"""The vision-language pretraining model around the built-in backbone.

Two objectives train the backbone's ViT, projectors and fusion transformer against the frozen
sentence encoder:

* **image-text contrast (ITC)**: an attention-pooled image embedding against the mean of the
  projected caption tokens, InfoNCE over the batch plus minimally changed captions as extra
  negatives; every caption whose fact holds for an image counts as a positive for it, so
  "a red box" is never pushed away from a second image with a red box;
* **image-text matching (ITM)**: the fusion transformer reads image and caption tokens and one
  read-out query — the same mechanism as the policy's action tokens — and a linear layer
  scores match / no match, with hard negatives (left and right swapped, one colour, shape or
  count changed, and the most confusable caption of another image).

* **left/right** (with ``text_order_layers``): the text embedding gains a word-order head:
  transformer layers over the sentence encoder's token states, read by two role queries (the
  object on the left, the object on the right), added to the mean-state embedding as a
  correction of at most ``text_order_norm``. A *claim* loss makes each role slot name its
  object's colour and shape in "X left of Y" captions, and each such caption is scored
  against itself with left and right swapped (the *order* loss). Without the claim loss the
  head settles on a word bias; without the length limit, phrasings it was never trained on
  move the embedding far (held-out place captions lost half their retrieval). With
  ``head_steps`` (PretrainConfig) all of this trains in a second phase on the locked backbone.

* **grounded attributes**: which colours and shapes stand in which scene cell (left / centre
  / right x near / far), multi-label from max-pooled image tokens — the facts the captions
  are written from, as a dense signal — and the same read through the fusion transformer by a
  read-out query (the path the policy's action tokens take), so the fusion layers learn to
  gather what is where. Without it the contrastive loss
  collapses the image embedding onto the caption prior in the first hundred steps (small
  objects on large random backgrounds), and nothing image-specific is learned in the CPU budget.

The backbone's weights ship; the pooling and score heads ship beside them under ``heads.``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobile_vla.config import BackboneConfig, BuiltinConfig
from mobile_vla.errors import ConfigError
from mobile_vla.models.backbones.builtin import BuiltinBackbone, init_weights
from mobile_vla.pretraining.caption_scenes import COLOURS, DEPTH, LATERAL, SHAPES, Fact

CELLS = [(lat, dep) for lat in LATERAL for dep in DEPTH]


HEADS = "heads."


class AttentionPool(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(tokens.shape[0], -1, -1)
        return self.norm(self.attn(q, tokens, tokens, need_weights=False)[0][:, 0])


class TextOrder(nn.Module):
    """The word order of a caption, for the contrastive text embedding: transformer layers over
    the sentence encoder's token states with learned positions, read by two role queries (the
    object on the left, the object on the right) through an output layer added to the linear
    map of the mean state. The mean state is close to a bag of words ("X to the right of Y" and
    the true "Y to the right of X" hold the same words); this is what can tell them apart. The
    claim head reads each role's slot; the output layer starts small (std 0.02), so the
    embedding starts close to the plain mean-state one."""

    ROLES = 2

    def __init__(
        self,
        text_width: int,
        width: int,
        layers: int,
        heads: int,
        max_len: int,
        out: int,
        max_norm: float = 0.0,
    ) -> None:
        super().__init__()
        # > 0: the head's share is at most this long, next to the unit-length mean-state
        # embedding (a correction for what a bag of words cannot see, not a second embedding)
        self.register_buffer("max_norm", torch.tensor(float(max_norm)))
        self.inp = nn.Linear(text_width, width)
        self.pos = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.roles = nn.Parameter(torch.randn(1, self.ROLES, width) * 0.02)
        self.read = nn.MultiheadAttention(width, heads, batch_first=True)
        self.role_norm = nn.LayerNorm(width)
        self.out = nn.Linear(self.ROLES * width, out)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def reset_parameters(self) -> None:
        """Every weight drawn anew from the global generator, as at construction."""
        for m in self.modules():
            if m is self:
                continue
            if isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()
            elif hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.roles, std=0.02)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def slots(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, roles, width): what the caption says is on the left and on the right."""
        x = self.inp(states) + self.pos[:, : states.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))
        q = self.roles.expand(x.shape[0], -1, -1)
        return self.role_norm(self.read(q, x, x, key_padding_mask=~mask, need_weights=False)[0])

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.out(self.slots(states, mask).flatten(1))
        if float(self.max_norm) > 0:
            out = out * (self.max_norm / out.norm(dim=-1, keepdim=True).clamp_min(self.max_norm))
        return out


class CellProbe(nn.Module):
    """Which colours and shapes are in which scene cell (lateral x depth), as multi-label
    presence read from the image tokens by max-pooling a linear map of each token: a small
    object makes one or two tokens, so a max (not a mean) over tokens finds it."""

    def __init__(self, width: int, cells: int, colours: int, shapes: int) -> None:
        super().__init__()
        self.cells, self.colours, self.shapes = cells, colours, shapes
        self.proj = nn.Linear(width, cells * (colours + shapes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, cells, colours + shapes) presence logits."""
        return self.proj(tokens).amax(dim=1).view(-1, self.cells, self.colours + self.shapes)


@dataclass(frozen=True)
class HeadsConfig:
    """What :class:`PretrainModel` builds beside the backbone (the pretraining config's head
    keys). An exported weights file's card stores it (``heads``), as transformers stores
    ``config.json``, so the model is rebuilt from the card, not guessed from tensor shapes."""

    temperature: float = 0.07
    text_order_layers: int = 0
    image_cells: bool = False
    text_order_width: int = 0
    text_order_norm: float = 0.0
    head_cells: bool = False

    @classmethod
    def from_pretrain(cls, cfg: Mapping[str, Any] | Any) -> HeadsConfig:
        """From a PretrainConfig (or its dict, as a card's ``pretrain_config`` holds it)."""
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d: getattr(cfg, k, d)
        return cls(**{f.name: get(f.name, f.default) for f in fields(cls)})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> HeadsConfig:
        unknown = set(obj) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown pretraining head keys {sorted(unknown)}")
        return cls(**obj)


class PretrainModel(nn.Module):
    def __init__(self, cfg: BuiltinConfig, heads: HeadsConfig = HeadsConfig()) -> None:
        super().__init__()
        self.heads_config = heads
        temperature, text_order_layers = heads.temperature, heads.text_order_layers
        image_cells, head_cells = heads.image_cells, heads.head_cells
        text_order_width, text_order_norm = heads.text_order_width, heads.text_order_norm
        bcfg = BackboneConfig(name="builtin", builtin=cfg, pretrained=False)
        self.backbone = BuiltinBackbone(bcfg)
        width = cfg.fusion_width
        vw = cfg.vision_width
        text_width = self.backbone.text_encoder.config.hidden_size
        # ITC reads the ViT's own tokens and the sentence encoder's mean state, not the fusion
        # tokens: those carry a shared type embedding that dominates a normalized mean at
        # initialization and collapses the contrastive loss onto the caption prior.
        self.image_pool = AttentionPool(vw, cfg.vision_heads)
        cell_width = len(CELLS) * (len(COLOURS) + len(SHAPES))
        # with image_cells the embedding also reads the grounded attributes (which colour and
        # shape in which scene cell): what a caption's left/right claim is checked against
        self.image_cells = image_cells
        self.image_head = nn.Linear(2 * vw + (cell_width if image_cells else 0), width)
        self.text_head = nn.Linear(text_width, width)
        self.text_order = (
            TextOrder(
                text_width,
                text_order_width or width,
                text_order_layers,
                cfg.fusion_heads,
                self.backbone.max_text_tokens,
                width,
                text_order_norm,
            )
            if text_order_layers
            else None
        )
        # off while a first phase trains without it (PretrainConfig.head_steps)
        self.order_active = True
        self.itm_query = nn.Parameter(torch.randn(1, width) * 0.02)
        self.itm_head = nn.Linear(width, 1)
        self.cell_probe = CellProbe(vw, len(CELLS), len(COLOURS), len(SHAPES))
        # what a left/right caption claims (the left object's colour and shape, the right
        # one's), read from the word-order head: it makes that head read roles, not words
        self.claim_head = (
            nn.Linear(text_order_width or width, len(COLOURS) + len(SHAPES))
            if text_order_layers
            else None
        )
        # the same grounded attributes read by a query through the fusion transformer
        self.fusion_query = nn.Parameter(torch.randn(1, width) * 0.02)
        self.fusion_probe = nn.Linear(width, len(CELLS) * (len(COLOURS) + len(SHAPES)))
        self.log_scale = nn.Parameter(torch.tensor(float(-torch.log(torch.tensor(temperature)))))
        init_weights(self.itm_head)  # the ITC heads and the probe keep PyTorch's default init
        for p in self.backbone.text_encoder.parameters():
            p.requires_grad_(False)
        self.backbone.text_encoder.eval()
        # the second phase's map of the grounded attributes into the image embedding (with
        # head_cells): built last, from zeros and outside the global generator, so the rest of
        # the model and the first phase are the same with or without it
        self.cell_map: nn.Linear | None = None
        if head_cells:
            with torch.random.fork_rng(devices=[]):
                self.cell_map = nn.Linear(cell_width, width)
            nn.init.zeros_(self.cell_map.weight)
            nn.init.zeros_(self.cell_map.bias)

    def train(self, mode: bool = True) -> PretrainModel:
        super().train(mode)
        self.backbone.text_encoder.eval()  # frozen: no dropout
        return self

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def vit(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ViT's patch tokens (N, P, vision_width)."""
        return self.backbone.vision(pixels)

    def vit_batches(
        self, images: np.ndarray | torch.Tensor, ids: list[int], size: int, mirror: bool = False
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """The ViT tokens of uint8 (N, H, W, 3) ``images[ids]``, ``size`` images at a time (of
        their mirror images, left and right swapped, with ``mirror``): (ids, tokens) pairs."""
        for start in range(0, len(ids), size):
            chunk = list(ids[start : start + size])
            x = torch.as_tensor(images[chunk]).permute(0, 3, 1, 2)
            if mirror:
                x = x.flip(-1)
            yield chunk, self.vit(self.backbone.preprocess(x))

    def fusion_image_tokens(self, vit: torch.Tensor) -> torch.Tensor:
        """The same tokens as the policy's fusion transformer sees them."""
        return self.backbone.vision_proj(vit) + self.backbone.type_embed[0]

    def image_embedding(self, vit: torch.Tensor) -> torch.Tensor:
        mapped = self.cell_map is not None and self.order_active
        parts = [self.image_pool(vit), vit.amax(dim=1)]
        if self.image_cells or mapped:
            cells = torch.sigmoid(self.cell_probe(vit).flatten(1))  # once for both uses
        if self.image_cells:
            parts.append(cells)
        emb = self.image_head(torch.cat(parts, dim=-1))
        if mapped:
            assert self.cell_map is not None
            emb = emb + self.cell_map(cells)
        return F.normalize(emb, dim=-1)

    def text_tokens(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.backbone.project_text(states)

    def text_embedding(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """From the sentence encoder's masked mean state (its own sentence embedding), plus
        the word-order head's share when there is one."""
        m = mask.unsqueeze(-1).to(states.dtype)
        mean = F.normalize((states * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)
        emb = self.text_head(mean)
        if self.text_order is not None and self.order_active:
            if float(self.text_order.max_norm) > 0:
                emb = F.normalize(emb, dim=-1)
            emb = emb + self.text_order(states, mask)
        return F.normalize(emb, dim=-1)

    def claim_loss(
        self, states: torch.Tensor, mask: torch.Tensor, facts: list[Fact]
    ) -> torch.Tensor:
        """The claim head's four cross-entropies (summed) on "X left of Y" captions: the left
        object's colour and shape from the word-order head's left slot, the right object's from
        its right slot."""
        assert self.text_order is not None and self.claim_head is not None
        logits = self.claim_head(self.text_order.slots(states, mask))  # (N, 2, colours + shapes)
        nc = len(COLOURS)
        colours, shapes = list(COLOURS), list(SHAPES)
        loss = torch.zeros((), device=states.device)
        for k, side in enumerate(("left", "right")):
            part = logits[:, k]
            objs = [getattr(f, side) for f in facts]  # (colour, shape) of that side's object
            colour = torch.tensor([colours.index(o[0]) for o in objs])
            shape = torch.tensor([shapes.index(o[1]) for o in objs])
            loss = (
                loss + F.cross_entropy(part[:, :nc], colour) + F.cross_entropy(part[:, nc:], shape)
            )
        return loss

    def reset_word_order(self, seed: int) -> None:
        """The word-order and claim heads' weights drawn anew from ``seed`` (the global
        generator is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.text_order is not None:
                self.text_order.reset_parameters()
            if self.claim_head is not None:
                self.claim_head.reset_parameters()

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=4.6052).exp()  # temperature >= 0.01

    def read_out(
        self, query: torch.Tensor, img: torch.Tensor, txt: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """The fusion transformer's output (N, D) at one read-out ``query`` (1, D) over image
        tokens and, optionally, (caption tokens, mask) — the way action tokens read a frame."""
        n = img.shape[0]
        ones = torch.ones(n, img.shape[1], dtype=torch.bool, device=img.device)
        q_mask = torch.ones(n, 1, dtype=torch.bool, device=img.device)
        parts, masks = [img], [ones]
        if txt is not None:
            parts.append(txt[0])
            masks.append(txt[1])
        parts.append(self.backbone._action_tokens(query, n))
        return self.backbone._fuse(parts, [*masks, q_mask], 1)[:, 0]

    def match_logits(
        self, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM logit per (image tokens, caption tokens) row pair, through the fusion."""
        return self.itm_head(self.read_out(self.itm_query, img, (txt, txt_mask))).squeeze(-1)

    def fusion_cells(self, img: torch.Tensor) -> torch.Tensor:
        """(N, cells, colours + shapes) presence logits read from fusion image tokens by a
        read-out query."""
        out = self.read_out(self.fusion_query, img, None)
        return self.fusion_probe(out).view(img.shape[0], len(CELLS), -1)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """Every backbone tensor except the sentence encoder's (it has its own package)."""
        return {
            k: v.detach().clone()
            for k, v in self.backbone.state_dict().items()
            if not k.startswith(BuiltinBackbone.pretrained_prefixes)
        }

    def export_state(self) -> dict[str, torch.Tensor]:
        """What ships: the backbone's tensors, and the pooling and score heads under
        ``heads.`` (the policy ignores them; ``pretrain-eval --weights`` uses them)."""
        heads = {
            HEADS + k: v.detach().clone()
            for k, v in self.state_dict().items()
            if not k.startswith("backbone.")
        }
        return {**self.backbone_state(), **heads}

    def load_export(self, state: dict[str, torch.Tensor]) -> None:
        backbone = {k: v for k, v in state.items() if not k.startswith(HEADS)}
        heads = {k.removeprefix(HEADS): v for k, v in state.items() if k.startswith(HEADS)}
        self.backbone.load_state_dict(backbone, strict=False)
        missing = self.load_state_dict(heads, strict=False).missing_keys
        if any(not k.startswith("backbone.") for k in missing):
            raise ConfigError(f"weights without the pretraining heads: missing {missing[:3]}")
