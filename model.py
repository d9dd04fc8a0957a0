"""InternLM2 decoder with partial LoRA (PLoRA), KV cache, image splicing, LM head, generation and checkpoint I/O.

One file from `config.json` + safetensors to logits: the math follows IXC-2.5's remote code (the official
modeling_internlm2.py / build_mlp.py of IXC-2.5), the key names follow the checkpoint (`model.layers.L.attention.wqkv`,
`...Plora_A`, `vision_proj`, `plora_glb_GN`). `InternLMXComposer2` is the chat/policy model; reward.py puts a `score`
head on the same trunk.
"""
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import batching
from data import DEFAULT_META, Tokenizer, atomic_write_bytes, atomic_write_text, chat_prompt, tokenize_segments
from vision import CLIPVisionTower, VisionConfig, build_vision_proj, hd_views, layout_tokens, load_visual


@dataclass
class Config:
    """The official `config.json` fields the model reads (7B defaults), plus what the checkpoint implies."""
    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: dict = None  # {"type": "dynamic", "factor": 2.0} in IXC-2.5
    max_position_embeddings: int = 24576
    max_length: int = 16384  # the official truncation length
    bias: bool = False
    pad_token_id: int = 2
    bos_token_id: int = 1
    eos_token_id: int = 2
    vision_config: dict = field(default_factory=dict)
    plora_rank: int = 256  # not a config field upstream: read from `Plora_A.weight.shape[0]` at load
    plora_dropout: float = 0.0  # official training uses 0.05; off by default so policy/ref/critic agree (RLHF)
    head: str = "output"  # "output" (LM), "score" (reward: linear) or "score_mlp" (BaseReward's 2-layer SiLU head)
    reward_mean: float | None = None  # held-out reward statistics stored by the RM stage (None: none stored), for
    reward_std: float | None = None   # PPO's reward normalisation

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")

    @classmethod
    def from_json(cls, path):
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config.json not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{path}: missing required field(s) {missing}")
        scaling = d.get("rope_scaling")
        if scaling is not None and (not isinstance(scaling, dict) or scaling.get("type") not in ("linear", "dynamic")
                                    or not isinstance(scaling.get("factor"), (int, float))):
            raise ValueError(f"{path}: rope_scaling is {scaling!r}; expected null or "
                             '{"type": "linear" | "dynamic", "factor": <number>} (the types InternLM2 allows)')
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def vision(self):
        return VisionConfig.from_dict(self.vision_config)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


# ----------------------------------------------------------------------------------------------------------------
# Decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()  # statistics in fp32, as upstream
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class PLoRA(nn.Linear):
    """Linear + a LoRA that acts only on image tokens (`im_mask`), scale alpha/r = 1 (build_mlp.py's PLoRA)."""

    def __init__(self, in_features, out_features, rank, bias=False, dropout=0.0):
        super().__init__(in_features, out_features, bias=bias)
        self.Plora_A = nn.Linear(in_features, rank, bias=False) if rank else None
        self.Plora_B = nn.Linear(rank, out_features, bias=False) if rank else None
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x, im_mask=None):
        y = super().forward(x)
        if self.Plora_A is None or im_mask is None:
            return y
        # The official code adds the LoRA to the gathered image tokens, y[im_mask] += B(A(x[im_mask])): a boolean
        # gather is a host read (its size), a stall per linear on a GPU. Masking the dense product gives the same
        # numbers (+ 0 on text tokens) for the LoRA's few FLOPs (rank r of D) on the text tokens too.
        return y + self.Plora_B(self.Plora_A(self.lora_dropout(x))) * im_mask[..., None].to(y.dtype)


def rope_inv_freq(cfg, kv_len):
    """RoPE frequencies; dynamic NTK raises the base once kv_len (the decoder's `rope_len`: the longest length seen,
    as upstream's cache) exceeds max_position_embeddings."""
    base, dim = cfg.rope_theta, cfg.head_dim
    scaling = cfg.rope_scaling or {}
    if scaling.get("type") == "dynamic" and kv_len > cfg.max_position_embeddings:
        f = scaling["factor"]
        base = base * (f * kv_len / cfg.max_position_embeddings - (f - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


def rope_cos_sin(cfg, position_ids, kv_len):
    """position_ids [B, L] -> cos, sin [B, 1, L, head_dim] in fp32 ("rotate_half" layout: the angles twice).
    Linear scaling (position interpolation) divides the positions by the factor, at every length."""
    inv_freq = rope_inv_freq(cfg, kv_len).to(position_ids.device)
    scaling = cfg.rope_scaling or {}
    positions = position_ids.float() / (scaling["factor"] if scaling.get("type") == "linear" else 1.0)
    angles = positions[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        r, p = cfg.plora_rank, cfg.plora_dropout
        self.wqkv = PLoRA(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * self.hd, r, cfg.bias, p)
        self.wo = PLoRA(self.n_head * self.hd, cfg.hidden_size, r, cfg.bias, p)

    def forward(self, x, im_mask, cos, sin, mask, cache, layer):
        B, L, _ = x.shape
        g = self.n_head // self.n_kv
        # packed rows: [kv group][g query heads, 1 key, 1 value][head_dim] (modeling_internlm2.py's rearrange)
        qkv = self.wqkv(x, im_mask).view(B, L, self.n_kv, g + 2, self.hd)
        q = qkv[:, :, :, :g].reshape(B, L, self.n_head, self.hd).transpose(1, 2)
        k = qkv[:, :, :, g].transpose(1, 2)
        v = qkv[:, :, :, g + 1].transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # query head h reads kv head h // g; enable_gqa avoids copying the cached keys/values g times per step
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1,
                                           enable_gqa=g > 1)
        return self.wo(y.transpose(1, 2).reshape(B, L, -1), im_mask)


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, h, r, p = cfg.hidden_size, cfg.intermediate_size, cfg.plora_rank, cfg.plora_dropout
        self.w1, self.w3, self.w2 = PLoRA(d, h, r, dropout=p), PLoRA(d, h, r, dropout=p), PLoRA(h, d, r, dropout=p)

    def forward(self, x, im_mask):
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, im_mask, cos, sin, mask, cache, layer):
        x = x + self.attention(self.attention_norm(x), im_mask, cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x), im_mask)


class KVCache:
    """Preallocated keys/values [layers, B, n_kv, max_len, head_dim] plus which key slots are real (not padding)."""

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.len = 0  # filled positions, shared by all rows
        self.n_layers = cfg.num_hidden_layers

    def append_valid(self, attention_mask):
        L = attention_mask.shape[1]
        if self.len + L > self.k.shape[3]:
            raise ValueError(f"KV cache overflow: {self.len} + {L} > {self.k.shape[3]} positions")
        self.valid[:, self.len:self.len + L] = attention_mask.bool()

    def update(self, layer, k, v):
        L = k.shape[2]
        self.k[layer, :, :, self.len:self.len + L] = k
        self.v[layer, :, :, self.len:self.len + L] = v
        if layer == self.n_layers - 1:
            self.len += L
            return self.k[layer, :, :, :self.len], self.v[layer, :, :, :self.len]
        return self.k[layer, :, :, :self.len + L], self.v[layer, :, :, :self.len + L]

    def repeat(self, n):
        """Best-of-N / group sampling: one prefilled prompt becomes n rows (each row repeated n times in place)."""
        for name in ("k", "v"):
            setattr(self, name, getattr(self, name).repeat_interleave(n, dim=1))
        self.valid = self.valid.repeat_interleave(n, dim=0)
        return self

    def keep(self, rows):
        """Only `rows` (a device index) go on decoding: the others' keys and values are dropped."""
        self.k, self.v, self.valid = self.k[:, rows], self.v[:, rows], self.valid[rows]
        return self


class InternLM2Model(nn.Module):
    """`model.*`: embeddings, decoder layers, final norm. Returns the final-normed hidden states."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        # Upstream's RoPE cache starts at max_position_embeddings and only grows; dynamic NTK sets its base from the
        # longest kv length seen so far, and later, shorter calls keep it. We keep that state too (it only matters
        # past max_position_embeddings: 24576 for the 7B models, beyond max_length 16384).
        self.rope_len = cfg.max_position_embeddings

    def forward(self, embeds, im_mask=None, attention_mask=None, position_ids=None, cache=None):
        """embeds [B, L, D]; im_mask [B, L] bool (PLoRA on); attention_mask [B, L] (0 = padding, any side);
        position_ids default to 0..L-1 after what the cache holds, as upstream (right padding never shifts them)."""
        B, L, _ = embeds.shape
        past = cache.len if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=embeds.device).expand(B, L)
        self.rope_len = max(self.rope_len, past + L)
        cos, sin = rope_cos_sin(self.cfg, position_ids, self.rope_len)
        mask = None
        if cache is not None:
            cache.append_valid(attention_mask if attention_mask is not None else torch.ones_like(position_ids))
            key_valid = cache.valid[:, :past + L]
        else:
            key_valid = attention_mask.bool() if attention_mask is not None else None
        # No mask (a caller whose batch has no padding passes attention_mask=None): is_causal, and CUDA picks the
        # FlashAttention-2 kernel; with a mask, the memory-efficient kernel, which reads it. Whether a mask holds
        # any padding is not asked here: the answer would be a host read, a stall per forward on a GPU.
        if key_valid is not None:
            # causal + key padding; a query always sees itself so fully padded rows never softmax over nothing
            q_pos = torch.arange(past, past + L, device=embeds.device)[:, None]
            k_pos = torch.arange(past + L, device=embeds.device)[None, :]
            mask = (k_pos <= q_pos)[None] & (key_valid[:, None, :] | (k_pos == q_pos)[None])
            mask = mask[:, None]
        elif L > 1 and past > 0:  # chunked prefill on a cache: plain causal offset by `past`
            q_pos = torch.arange(past, past + L, device=embeds.device)[:, None]
            mask = (torch.arange(past + L, device=embeds.device)[None, :] <= q_pos)[None, None]
        x = embeds
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:  # a cache is written in forward
                x = torch.utils.checkpoint.checkpoint(layer, x, im_mask, cos, sin, mask, None, i,
                                                      use_reentrant=False)
            else:
                x = layer(x, im_mask, cos, sin, mask, cache, i)
        return self.norm(x)


class PrefixKV:
    """Keys/values of a shared prompt kept as autograd tensors, for a training forward that continues one prefix in
    several rows (the reward model's chosen and rejected answers). KVCache writes in place, which autograd cannot
    differentiate through twice; here each update concatenates, so gradients reach the prefix from every row."""

    def __init__(self, cfg):
        self.k, self.v = [None] * cfg.num_hidden_layers, [None] * cfg.num_hidden_layers
        self.valid, self.len, self.n_layers = None, 0, cfg.num_hidden_layers

    def append_valid(self, attention_mask):
        m = attention_mask.bool()
        self.valid = m if self.valid is None else torch.cat([self.valid, m], 1)

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        if layer == self.n_layers - 1:
            self.len = k.shape[2]
        return k, v

    def repeat(self, n):
        """Row b becomes rows b*n .. b*n+n-1 (the copies share the prefix's autograd history)."""
        self.k = [t.repeat_interleave(n, 0) for t in self.k]
        self.v = [t.repeat_interleave(n, 0) for t in self.v]
        self.valid = self.valid.repeat_interleave(n, 0)
        return self


# ----------------------------------------------------------------------------------------------------------------
# The multimodal model: vision path + decoder + head


class InternLMXComposer2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        vcfg = cfg.vision
        self.model = InternLM2Model(cfg)
        self.vit = CLIPVisionTower(vcfg)
        self.vision_proj = build_vision_proj(vcfg.hidden_size, cfg.hidden_size)
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * vcfg.hidden_size))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * vcfg.hidden_size))
        if cfg.head == "output":
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        elif cfg.head == "score":
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        elif cfg.head == "score_mlp":
            self.score = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.SiLU(),
                                       nn.Linear(cfg.hidden_size, 1))
        else:
            raise ValueError(f"unknown head {cfg.head!r}; expected 'output', 'score' or 'score_mlp'")
        self.tokenizer = None

    @property
    def device(self):
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self):
        return self.model.tok_embeddings.weight.dtype

    # --- vision ---
    def encode_images(self, pixel_list):
        """HD pixel tensors -> projected image tokens [n_i, D] each (one ViT batch over all views of all images)."""
        crop, grid = self.cfg.vision.image_size, self.cfg.vision.grid
        views, grids = zip(*(hd_views(batching.to_device(p, self.device), crop) for p in pixel_list))
        feats = self.vit(torch.cat(views).to(self.dtype))
        tokens, start = [], 0
        for hw in grids:
            n = 1 + hw[0] * hw[1]
            tokens.append(layout_tokens(feats[start:start + n], hw, self.plora_glb_GN, self.plora_sub_GN, grid))
            start += n
        return [self.vision_proj(t) for t in tokens]

    def splice(self, segments, images):
        """Official splicing: token-id segments and image indices -> embeds [L, D], im_mask [L] (PLoRA on image
        tokens, separators included) and ids [L] (-100 at image tokens)."""
        return self.splice_rows([(segments, images)])[0]

    def splice_rows(self, rows):
        """`splice` of many rows ((segments, images) each) with one token-embedding lookup for all their text: the
        backward of every lookup adds a dense vocab x hidden gradient (190 MB at 92,544 x 512), so one per batch,
        not one per segment. Token ids: lists, or tensors already on the device (batching.ids_to_device)."""
        texts = [seg if torch.is_tensor(seg) else torch.tensor(seg, dtype=torch.long, device=self.device)
                 for segments, _ in rows for seg in segments if not isinstance(seg, int)]
        looked_up = iter(self.model.tok_embeddings(torch.cat(texts)).split([len(t) for t in texts]) if texts else [])
        texts, out = iter(texts), []
        for segments, images in rows:
            parts, masks, ids = [], [], []
            for seg in segments:
                if isinstance(seg, int):
                    e = images[seg]
                    ids.append(torch.full((e.shape[0],), -100, dtype=torch.long, device=self.device))
                else:
                    ids.append(next(texts))
                    e = next(looked_up)
                parts.append(e)
                masks.append(torch.full((e.shape[0],), isinstance(seg, int), dtype=torch.bool, device=self.device))
            out.append((torch.cat(parts), torch.cat(masks), torch.cat(ids)))
        return out

    def embed(self, segments, pixel_list=(), max_length=None):
        embeds, im_mask, _ = self.splice(segments, self.encode_images(pixel_list) if len(pixel_list) else [])
        return embeds[:max_length], im_mask[:max_length]

    def embed_batch(self, seqs, left_pad=False):
        """[(segments, pixel tensors)] -> padded batch dict; all images of the batch go through one ViT call."""
        pixels = [p for _, px in seqs for p in px]
        images = self.encode_images(pixels) if pixels else []
        rows, k = [], 0
        for segments, px in seqs:
            rows.append((segments, images[k:k + len(px)]))
            k += len(px)
        return self.pad_batch(self.splice_rows(rows), left_pad)

    def pad_batch(self, rows, left_pad=False):
        """Rows of (embeds, im_mask[, ids]) -> batch with the pad token's embedding, attention_mask 0, im_mask 0,
        ids -100 on padding, and position ids that count real tokens only (so left padding changes nothing)."""
        L = max(r[0].shape[0] for r in rows)
        B, D = len(rows), rows[0][0].shape[1]
        # detached: padding reaches no output, so its gradient is 0, but its lookup's backward would be dense
        pad = self.model.tok_embeddings.weight[self.cfg.pad_token_id].detach()
        embeds = pad.expand(B, L, D).clone()
        im_mask = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        attention_mask = torch.zeros(B, L, dtype=torch.long, device=self.device)
        ids = torch.full((B, L), -100, dtype=torch.long, device=self.device)
        for b, row in enumerate(rows):
            n = row[0].shape[0]
            at = slice(L - n, L) if left_pad else slice(0, n)
            embeds[b, at], im_mask[b, at], attention_mask[b, at] = row[0], row[1], 1
            if len(row) > 2:
                ids[b, at] = row[2]
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return {"embeds": embeds, "im_mask": im_mask, "attention_mask": attention_mask, "ids": ids,
                "position_ids": position_ids}

    def sequence(self, text, images=(), hd_num=24, train_transform=False):
        """Text with `<ImageHere>` placeholders + images -> (token segments, HD pixel tensors), the input of embed /
        embed_batch. Several images force hd_num 6, as upstream."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached: load with from_pretrained or set model.tokenizer")
        images = list(images)
        return tokenize_segments(self.tokenizer, text, len(images)), self.load_images(images, hd_num, train_transform)

    def load_images(self, images, hd_num=24, train_transform=False):
        """Image / video paths -> HD pixel tensors; several images force hd_num 6, as upstream."""
        hd_num = 6 if len(images) > 1 else hd_num
        return [load_visual(im, hd_num, self.cfg.vision.image_size, train_transform) for im in images]

    def prepare(self, text, images=(), hd_num=24, max_length=None, train_transform=False):
        """Text with `<ImageHere>` placeholders + images -> (embeds, im_mask)."""
        return self.embed(*self.sequence(text, images, hd_num, train_transform), max_length)

    # --- LM head and generation ---
    def forward(self, embeds, im_mask=None, attention_mask=None, position_ids=None, cache=None):
        h = self.model(embeds, im_mask, attention_mask, position_ids, cache)
        return self.output(h).float()

    @torch.no_grad()
    def generate(self, embeds, im_mask, attention_mask=None, max_new_tokens=64, temperature=0.0, top_p=1.0,
                 stop_ids=None, generator=None, n=1, repetition_penalty=1.0):
        """Sample continuations of left-padded prompts (embeds [B, L, D]); the prompt is prefilled once and its KV
        cache copied to `n` rows per prompt (best-of-N, group sampling). Returns new ids [B*n, T], pad after stop.

        One host read per step (how many rows have ended). Rows that have ended leave the batch and the KV cache
        once DROP_ENDED of the rows still decoding have ended (the copy of the cache is then cheaper than
        decoding them on); with one generator shared by the rows they stay, since dropping them would change
        which random number each row draws."""
        B, L, _ = embeds.shape
        stop_ids = torch.tensor(stop_ids or [self.tokenizer.eos_id, self.tokenizer.eot_id], device=self.device)
        attention_mask = torch.ones(B, L, dtype=torch.long, device=self.device) if attention_mask is None \
            else attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        cache = KVCache(self.cfg, B, L + max_new_tokens, self.dtype, self.device)
        logits = self.output(self.model(embeds, im_mask, attention_mask, position_ids, cache)[:, -1]).float()
        if n > 1:
            cache.repeat(n)
            logits, position_ids = logits.repeat_interleave(n, 0), position_ids.repeat_interleave(n, 0)
        next_pos = position_ids[:, -1:] + 1
        out = torch.full((B * n, max_new_tokens), self.cfg.pad_token_id, dtype=torch.long, device=self.device)
        rows = torch.arange(B * n, device=self.device)  # the row of `out` each decoding row writes
        done = torch.zeros(B * n, dtype=torch.bool, device=self.device)
        bos = torch.full((B * n, 1), self.cfg.bos_token_id, dtype=torch.long, device=self.device)
        can_drop = temperature <= 0 or isinstance(generator, (list, tuple))
        for t in range(max_new_tokens):
            if repetition_penalty != 1.0:  # HF rule: divide positive logits, multiply negative ones
                # transformers 4.33 starts generation from inputs_embeds with input_ids [[bos]], so BOS counts as seen
                prev = torch.cat([bos[rows], out[rows, :t]], 1)
                seen = logits.gather(1, prev)
                logits = logits.scatter(1, prev, torch.where(seen > 0, seen / repetition_penalty,
                                                             seen * repetition_penalty))
            tok = sample_token(logits, temperature, top_p, generator)
            tok = torch.where(done, torch.full_like(tok, self.cfg.pad_token_id), tok)
            out[rows, t] = tok
            done |= torch.isin(tok, stop_ids)
            ended = int(done.sum())
            if ended == len(done):
                return out[:, :t + 1]
            if can_drop and ended >= max(1, DROP_ENDED * len(done)):
                going = (~done).nonzero().squeeze(1)
                cache.keep(going)
                rows, tok, next_pos, done = rows[going], tok[going], next_pos[going], done[going]
                if isinstance(generator, (list, tuple)):
                    generator = [generator[i] for i in going.tolist()]
            emb = self.model.tok_embeddings(tok)[:, None]
            logits = self(emb, None, torch.ones(len(rows), 1, dtype=torch.long, device=self.device), next_pos,
                          cache)[:, -1]
            next_pos = next_pos + 1
        return out

    def chat(self, query, image=(), history=(), use_meta=False, hd_num=24, max_new_tokens=512, temperature=0.0,
             top_p=1.0, repetition_penalty=1.005, meta_instruction=DEFAULT_META, max_length=16384):
        """The official `chat` helper (its default repetition_penalty 1.005): query (+ images), history -> response.
        The prompt is cut at max_length as upstream's interleav_wrap_chat does (with a warning here)."""
        images = [] if image is None else [image] if isinstance(image, (str, Path)) else list(image)
        meta = meta_instruction if use_meta else None
        embeds, im_mask = self.prepare(chat_prompt(query, history, meta), images, hd_num)
        if embeds.shape[0] > max_length:
            warnings.warn(f"chat prompt of {embeds.shape[0]} tokens cut to max_length={max_length}", stacklevel=2)
            embeds, im_mask = embeds[:max_length], im_mask[:max_length]
        ids = self.generate(embeds[None], im_mask[None], max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, repetition_penalty=repetition_penalty)[0].tolist()
        response = self.tokenizer.decode([i for i in ids if i not in (self.tokenizer.eos_id, self.tokenizer.eot_id)])
        return response, list(history) + [(query, response)]

    @torch.no_grad()
    def answer(self, prompts, hd_num=24, max_new_tokens=64, temperature=0.0, top_p=1.0, n=1, generator=None):
        """Batched chat: [(query, images) or (query, images, history)] -> n decoded answers per prompt (left-padded
        prompts, one prefill). History: earlier (query, response) turns, as `chat` takes them."""
        batch = self.embed_batch([self.sequence(chat_prompt(q, *rest), ims, hd_num) for q, ims, *rest in prompts],
                                 left_pad=True)
        out = self.generate(batch["embeds"], batch["im_mask"], batch["attention_mask"], max_new_tokens,
                            temperature, top_p, generator=generator, n=n)
        return [self.decode_answer(row) for row in out.tolist()]

    def decode_answer(self, ids):
        """Generated ids -> text up to the first stop token."""
        stop = {self.tokenizer.eos_id, self.tokenizer.eot_id}
        end = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        return self.tokenizer.decode(ids[:end])

    # --- loading and saving ---
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device=None, tokenizer=None, head=None, seed=0,
                        **overrides):
        """Load a checkpoint directory. `head` ("output", "score", "score_mlp") swaps the head: a policy becomes a
        reward model (or critic) with a freshly initialised score head, as when the RM is built from IXC-2.5."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        cfg = Config.from_json(path / "config.json")
        files = checkpoint_files(path)
        shapes = tensor_shapes(files)
        plora = [s[0] for k, s in shapes.items() if k.endswith("Plora_A.weight")]
        cfg.plora_rank = plora[0] if plora else 0
        stored = "output" if "output.weight" in shapes else "score_mlp" if "score.0.weight" in shapes else "score"
        cfg.head = head or stored
        for k, v in overrides.items():
            setattr(cfg, k, v)
        with torch.device("meta"):
            model = cls(cfg)
        fresh = cfg.head != stored
        load_weights(model, files, dtype, device or "cpu", skip=("output.", "score.") if fresh else ())
        if fresh:
            head_module = model.output if cfg.head == "output" else model.score
            head_module.to_empty(device=device or "cpu").to(dtype)
            init_weights(head_module, seed)
        tok = tokenizer or (path / "tokenizer.model")
        model.tokenizer = tok if isinstance(tok, Tokenizer) else Tokenizer(tok)
        return model.eval()

    def save_pretrained(self, path, metadata=None, state=None):
        """config.json + model.safetensors (+ tokenizer.model), each written to a temp name and renamed. `state`: the
        weights when they are not this module's own tensors (gathered from FSDP's shards by train.py)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.cfg)
        for k in ("plora_dropout", "plora_rank", "head"):  # implied by the tensors
            cfg.pop(k)
        atomic_write_text(path / "config.json", json.dumps(cfg, indent=2))
        state = state or {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path / "model.safetensors")
        if self.tokenizer is not None and (path / "tokenizer.model").resolve() != self.tokenizer.path.resolve():
            atomic_write_bytes(path / "tokenizer.model", self.tokenizer.path.read_bytes())


# generate: drop ended rows once this fraction of the rows still decoding has ended
DROP_ENDED = 0.25


def sample_token(logits, temperature=0.0, top_p=1.0, generator=None):
    """Greedy at temperature 0; else nucleus sampling from softmax(logits / T)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    # inverse-CDF sampling: one uniform per row (torch.multinomial draws one exponential per vocab entry, which
    # dominated best-of-N time on CPU at vocab 92544)
    cdf = probs.cumsum(-1)
    if isinstance(generator, (list, tuple)):  # one generator per row: a row's samples do not depend on its batch
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows; give one per row (B * n)")
        u = torch.cat([torch.rand(1, 1, generator=g, device=probs.device) for g in generator]) * cdf[:, -1:]
    else:
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files (safetensors only)

# stored upstream but never used by the forward pass: chat-only task LoRAs (infer_mode 'write'/'web'), CLIP's
# post_layernorm, and non-persistent buffers that old exports may carry
IGNORED_KEYS = (".lora_sft_", ".lora_dpo_", ".lora_web_", "post_layernorm.", "rotary_emb.", "position_ids")


def checkpoint_files(path):
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(path.glob("model*.safetensors"))  # not resume.safetensors (training state) or other files
    if files:
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise ValueError(f"{path} holds only pickle weights (.bin/.pt), which we do not load (pickle can run code). "
                         "Use the safetensors files: for internlm/internlm-xcomposer2d5-7b-reward they are on the "
                         "model repo's refs/pr/1 branch (model-0000x-of-00003.safetensors + index).")
    raise FileNotFoundError(f"no *.safetensors weights in {path}")


def tensor_shapes(files):
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
            raise ValueError(f"cannot read safetensors file {f}: {e} (truncated or corrupt download?)") from None
    return shapes


def load_weights(model, files, dtype, device, skip=()):
    """Copy each tensor once from the memory-mapped files into the (meta-initialised) model; strict on names/shapes
    except for the `skip` prefixes (a head being replaced)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(skip)}
    found, problems = {}, []
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for k in sf.keys():
                if k not in expected:
                    if not any(s in k for s in IGNORED_KEYS) and not k.startswith(skip):
                        problems.append(f"unexpected: {k}")
                    continue
                shape = tuple(sf.get_slice(k).get_shape())
                if shape != expected[k]:
                    problems.append(f"wrong shape: {k} is {list(shape)} in {f.name}, model expects {list(expected[k])}")
                    continue
                try:
                    found[k] = sf.get_tensor(k).to(device=device, dtype=dtype)
                except Exception as e:
                    raise ValueError(f"cannot read tensor {k} from {f}: {e} (truncated or corrupt file?)") from None
    problems += [f"missing: {k}" for k in expected if k not in found]
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise ValueError(f"checkpoint {files[0].parent} does not match the model "
                         f"({len(problems)} problem(s)):\n  " + "\n  ".join(shown))
    model.load_state_dict(found, assign=True, strict=not skip)


def add_device_args(p):
    """--device / --dtype for the inference entry points (bon.py, clean.py, reward.py): the GPU in bf16 when there
    is one, as the official checkpoints are meant to run."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype; auto: bfloat16 on CUDA, float32 on CPU")


def device_kwargs(a):
    """from_pretrained's dtype and device for the arguments of add_device_args."""
    auto = torch.bfloat16 if str(a.device).startswith("cuda") else torch.float32
    return {"dtype": auto if a.dtype == "auto" else getattr(torch, a.dtype), "device": a.device}


def init_weights(module, seed=0, std=0.02):
    """Fresh weights for training from scratch or a new head: N(0, std) matrices and embeddings, zero biases, unit
    norms, and zero `Plora_B` so a new PLoRA starts as a no-op. A scalar head gets N(0, 1/sqrt(D+1)) (the N+
    implementation details; OpenRLHF's value head uses std 1/(D+1))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            elif name.endswith("bias") or "Plora_B" in name:
                p.zero_()
            elif p.dim() == 2 and p.shape[0] == 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1] + 1))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def add_layers(model, k, seed=0):
    """Stack `k` fresh decoder layers on top of `model`'s whose residual branches start at zero (`wo` and `w2`,
    PLoRA included), so each is the identity at first and the model scores exactly as before; training then has k
    more layers after the trunk's last. For a reward model whose trunk knows a value only in its last layers,
    leaving none for the reward token to compare it with the stated one (depth up-scaling; zero-initialised
    residual branches as in Goyal et al. 2017 and ReZero)."""
    p = next(model.parameters())
    for i in range(k):
        layer = init_weights(DecoderLayer(model.cfg), seed + i).to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for name, w in layer.named_parameters():
                if name.startswith(("attention.wo.", "feed_forward.w2.")):
                    w.zero_()
        model.model.layers.append(layer)
    model.cfg.num_hidden_layers += k
    return model
