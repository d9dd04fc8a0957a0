"""IXC-2.5-Reward: the `score` head on the IXC-2.5 trunk, the official scoring API, and the benchmark metrics.

    python reward.py --ckpt DIR --conv chat.json [--image a.png ...] [--hd-num 24]
    python reward.py eval --bench vl_rewardbench --data FILE (--ckpt DIR [--images DIR] | --scores FILE)

The score is `score(norm(h))` read at the last real position, which with the reward template holds the reward token
`[UNUSED_TOKEN_130]` (spec ixc25.md §10). API semantics follow the official remote code, including its quirks:
several images force hd_num 6, truncation at max_length can cut the reward token, `rank` returns indices best first.
"""
import argparse
import json
import math
import random
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from data import reward_template
from model import InternLMXComposer2


class RewardModel(InternLMXComposer2):
    """Load with `RewardModel.from_pretrained(dir)`: the head is `score.weight` [1, D] (or BaseReward's MLP)."""

    def forward(self, embeds, im_mask=None, attention_mask=None, position_ids=None, cache=None):
        """Reward at every position [B, L] (float32); the critic reads it at every response token."""
        h = self.model(embeds, im_mask, attention_mask, position_ids, cache)
        return self.score(h).float().squeeze(-1)

    def encode(self, conversation, images=(), hd_num=24, max_length=16384, apply_template=True):
        """A conversation (list of {"role", "content"}) or, with apply_template=False, a formatted string."""
        text = reward_template(conversation) if apply_template else conversation
        embeds, im_mask = self.prepare(text, images, hd_num, max_length=None)
        if embeds.shape[0] > max_length:
            cut = embeds.shape[0] - max_length
            what = "the reward token is cut off, so the score is read at an arbitrary position" if apply_template \
                else "the last tokens are lost"
            warnings.warn(f"sequence of {embeds.shape[0]} tokens truncated to max_length={max_length} "
                          f"({cut} dropped, as the official code does): {what}", stacklevel=3)
            embeds, im_mask = embeds[:max_length], im_mask[:max_length]
        return embeds, im_mask

    def score_embedded(self, items):
        """[(embeds [L_i, D], im_mask [L_i])] -> scores [B]: right-padded with the pad token's embedding, one
        forward, each read at its last real position (padding sits after every real token, so causal attention
        keeps it out of the scores)."""
        L = max(e.shape[0] for e, _ in items)
        pad = self.model.tok_embeddings.weight[self.cfg.pad_token_id]
        embeds = pad.expand(len(items), L, -1).clone()
        im_mask = torch.zeros(len(items), L, dtype=torch.bool, device=self.device)
        attention_mask = torch.zeros(len(items), L, dtype=torch.long, device=self.device)
        for b, (e, m) in enumerate(items):
            embeds[b, :e.shape[0]], im_mask[b, :e.shape[0]], attention_mask[b, :e.shape[0]] = e, m, 1
        rewards = self(embeds, im_mask, attention_mask)
        ends = attention_mask.cumsum(1).argmax(1)
        return rewards.gather(1, ends[:, None]).squeeze(1)

    @torch.no_grad()
    def get_score(self, conversation, images=(), hd_num=24, max_length=16384, apply_template=True):
        item = self.encode(conversation, images, hd_num, max_length, apply_template)
        return self.score_embedded([item]).item()

    @torch.no_grad()
    def get_scores(self, conversations, images=None, hd_num=24, max_length=16384, apply_template=True):
        """One right-padded batch. Always a list (upstream returns a bare float for a single conversation)."""
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} image lists")
        items = [self.encode(c, im, hd_num, max_length, apply_template) for c, im in zip(conversations, images)]
        return self.score_embedded(items).tolist()

    def compare(self, conversation1, images1, conversation2, images2, hd_num=24, max_length=16384,
                return_logits=False):
        """Is conversation1 better? Two separate get_score calls, as upstream."""
        s1 = self.get_score(conversation1, images1, hd_num, max_length)
        s2 = self.get_score(conversation2, images2, hd_num, max_length)
        return (s1 > s2, [s1, s2]) if return_logits else s1 > s2

    def rank(self, conversations, images=None, hd_num=24, max_length=16384, return_logits=False):
        """Candidate indices sorted best first (not per-candidate ranks); scores in input order."""
        scores = self.get_scores(conversations, images, hd_num, max_length)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return (order, scores) if return_logits else order
