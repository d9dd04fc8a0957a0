"""IXC-2.5-Reward: the `score` head on the IXC-2.5 trunk and the official scoring API.

    python reward.py --ckpt DIR --conv chat.json [--image a.png ...] [--hd-num 24]

Benchmark accuracy (VL-RewardBench, RM-Bench, RewardBench) is `evaluate.py`.

The score is `score(norm(h))` read at the last real position, which with the reward template holds the reward token
`[UNUSED_TOKEN_130]` (the official remote code). API semantics follow the official remote code, including its quirks:
several images force hd_num 6, truncation at max_length can cut the reward token, `rank` returns indices best first.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

import data
from data import reward_template
from model import InternLMXComposer2, PrefixKV, add_device_args, device_kwargs


def pool_last(rewards, attention_mask):
    """The reward at the last real position of each row (upstream: argmax of cumsum(attention_mask))."""
    return rewards.gather(1, attention_mask.cumsum(1).argmax(1)[:, None]).squeeze(1)


class RewardModel(InternLMXComposer2):
    """Load with `RewardModel.from_pretrained(dir)`: the head is `score.weight` [1, D] (or BaseReward's MLP)."""

    def forward(self, embeds, im_mask=None, attention_mask=None, position_ids=None, cache=None):
        """Reward at every position [B, L] (float32); the critic reads it at every response token."""
        h = self.model(embeds, im_mask, attention_mask, position_ids, cache)
        return self.score(h).float().squeeze(-1)

    def encode(self, conversation, images=(), hd_num=24, max_length=16384, apply_template=True):
        """A conversation (list of {"role", "content"}) or, with apply_template=False, a formatted string."""
        return self.encode_many([conversation], [images], hd_num, max_length, apply_template)[0]

    def encode_many(self, conversations, images, hd_num=24, max_length=16384, apply_template=True,
                    train_transform=False):
        """Each conversation -> (embeds, im_mask), cut at max_length as upstream; all images in one ViT batch."""
        for ims in images:
            if isinstance(ims, (str, bytes)):  # a bare path would otherwise be read as one image per character
                raise TypeError(f"images: expected one list of paths per conversation, got the string {ims!r}")
        seqs = [self.sequence(reward_template(conv) if apply_template else conv, ims, hd_num, train_transform)
                for conv, ims in zip(conversations, images)]
        pixels = [p for _, px in seqs for p in px]
        encoded = self.encode_images(pixels) if pixels else []
        out, k = [], 0
        for segments, px in seqs:
            embeds, im_mask, _ = self.splice(segments, encoded[k:k + len(px)])
            k += len(px)
            if embeds.shape[0] > max_length:
                what = "the reward token is cut off, so the score is read at an arbitrary position" \
                    if apply_template else "the last tokens are lost"
                warnings.warn(f"sequence of {embeds.shape[0]} tokens truncated to max_length={max_length} "
                              f"({embeds.shape[0] - max_length} dropped, as the official code does): {what}",
                              stacklevel=4)
                embeds, im_mask = embeds[:max_length], im_mask[:max_length]
            out.append((embeds, im_mask))
        return out

    def score_embedded(self, items):
        """[(embeds [L_i, D], im_mask [L_i])] -> scores [B]: right-padded with the pad token's embedding, one
        forward, each read at its last real position (padding sits after every real token, so causal attention
        keeps it out of the scores)."""
        batch = self.pad_batch(items)
        rewards = self(batch["embeds"], batch["im_mask"], batch["attention_mask"])
        return pool_last(rewards, batch["attention_mask"])

    def rewards_alone(self, seqs, max_length=None):
        """Rewards r(x, y) of (segments, pixels) sequences: one right-padded batch, each row's reward the score head
        at its last real token (the reward token). Segments are token-id lists, and an int where image i goes."""
        batch = self.embed_batch(seqs)
        L = batch["embeds"].shape[1]
        if max_length and L > max_length:
            warnings.warn(f"a sequence of {L} tokens truncated to max_length {max_length}: its reward token is lost")
            batch = {k: v[:, :max_length] for k, v in batch.items()}
        return pool_last(self(batch["embeds"], batch["im_mask"], batch["attention_mask"]), batch["attention_mask"])

    # --stage rm's default path (--share-prefix 1) is an optimisation only: read rewards_alone, above, for the math
    def pair_rewards(self, seqs, max_length=None):
        """rewards_alone's numbers for [c0, r0, c1, r1, ...] ((segments, pixels) each; a pair shares its images),
        computed faster. A pair's common prefix (image and prompt, most of its tokens) runs once and both
        answers continue from its keys/values: same numbers and gradients, a third to half less compute."""
        flat = [[t for seg in segs for t in (seg if isinstance(seg, list) else [("image", seg)])] for segs, _ in seqs]
        cut = []
        for a, b in zip(flat[0::2], flat[1::2]):
            d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            cut.append(min(d, len(a) - 1, len(b) - 1))  # every continuation keeps at least its reward token
        cuts = [c for c in cut for _ in (0, 1)]
        if min(cut) == 0 or any(isinstance(t, tuple) for f, d in zip(flat, cuts) for t in f[d:]):
            return self.rewards_alone(seqs, max_length)  # an image after the answers diverge: nothing to share
        prefixes = []
        for (segs, pixels), d in zip(seqs[0::2], cut):
            out, n = [], 0
            for seg in segs:
                if n >= d:
                    break
                out.append(seg if isinstance(seg, int) else seg[:d - n])
                n += 1 if isinstance(seg, int) else len(out[-1])
            prefixes.append((out, pixels))
        pre = self.embed_batch(prefixes, left_pad=True)
        pre_len = pre["attention_mask"].sum(1).repeat_interleave(2)
        if max_length and max(int(p) + len(f) - d for p, f, d in zip(pre_len, flat, cuts)) > max_length:
            return self.rewards_alone(seqs, max_length)  # truncation, warned about there
        cache = PrefixKV(self.cfg)
        h = self.model(pre["embeds"], pre["im_mask"], pre["attention_mask"], pre["position_ids"], cache)
        cache.repeat(2)
        cont = self.pad_batch([(e, torch.zeros(len(e), dtype=torch.bool, device=self.device))
                               for e, _, _ in self.splice_rows([([f[d:]], []) for f, d in zip(flat, cuts)])])
        position_ids = cont["position_ids"] + pre_len[:, None]
        rewards = self(cont["embeds"], cont["im_mask"], cont["attention_mask"], position_ids, cache)
        # the prefix's last-layer outputs reach no reward; keeping them in the graph gives the weights only they use
        # a zero gradient, as scoring each sequence alone does, so AdamW still decays them and optimizer states match
        return pool_last(rewards, cont["attention_mask"]) + 0.0 * h.sum()

    # The four methods below take their arguments in the official order (conversation, images, max_length, hd_num,
    # [return_logits,] apply_template), so code written for the released model passes them positionally unchanged.

    @torch.no_grad()
    def get_score(self, conversation, images=(), max_length=16384, hd_num=24, apply_template=True):
        item = self.encode(conversation, images, hd_num, max_length, apply_template)
        return self.score_embedded([item]).item()

    @torch.no_grad()
    def get_scores(self, conversations, images=None, max_length=16384, hd_num=24, apply_template=True):
        """One right-padded batch: a list of floats, or, as upstream (`squeeze().tolist()`), a bare float when there
        is a single conversation (`score_list` always returns a list)."""
        scores = self.score_list(conversations, images, max_length, hd_num, apply_template)
        return scores[0] if len(scores) == 1 else scores

    @torch.no_grad()
    def score_list(self, conversations, images=None, max_length=16384, hd_num=24, apply_template=True):
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} image lists")
        return self.score_embedded(self.encode_many(conversations, images, hd_num, max_length, apply_template)).tolist()

    def compare(self, conversation1, images1, conversation2, images2, max_length=16384, hd_num=24,
                return_logits=False, apply_template=True):
        """Is conversation1 better? Two separate get_score calls, as upstream."""
        s1 = self.get_score(conversation1, images1, max_length, hd_num, apply_template)
        s2 = self.get_score(conversation2, images2, max_length, hd_num, apply_template)
        return (s1 > s2, [s1, s2]) if return_logits else s1 > s2

    def rank(self, conversations, images=None, max_length=16384, hd_num=24, return_logits=False, apply_template=True):
        """Candidate indices sorted best first (not per-candidate ranks); scores in input order."""
        scores = self.score_list(conversations, images, max_length, hd_num, apply_template)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return (order, scores) if return_logits else order


def reward_norm(rm, normalize):
    """(mean, std) a reward model's scores are standardised with: the held-out statistics the RM stage stored, when
    asked and stored (a checkpoint without them, the released one, scores as it is)."""
    if not normalize or rm.cfg.reward_mean is None:
        return 0.0, 1.0
    return rm.cfg.reward_mean, rm.cfg.reward_std


def ensemble_scores(rms, convs, images, hd_num, normalize=False):
    """Mean over reward models of their scores (each optionally standardised by its stored held-out mean/std)."""
    total = torch.zeros(len(convs))
    for rm in rms:
        mean, std = reward_norm(rm, normalize)
        total += (torch.tensor(rm.score_list(convs, images, hd_num=hd_num)) - mean) / std
    return (total / len(rms)).tolist()


DEFAULT_RM = "runs/rm"   # where `train.py --stage rm` writes by default


def reward_dirs(paths):
    """--rm as given, or the reward model the README's first command trains; a missing directory is named together
    with the command that makes it."""
    paths = paths or [DEFAULT_RM]
    for p in paths:
        if not Path(p, "config.json").is_file():
            make = ("train it first: torchrun --standalone --nproc_per_node 2 train.py --stage rm" if p == DEFAULT_RM
                    else "name a reward model directory (a train.py --stage rm output, or the released checkpoint)")
            raise FileNotFoundError(f"no reward model in {p}: {make}")
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        raise ValueError("benchmark accuracy is its own command: python evaluate.py --bench ... (see its --help)")
    p = argparse.ArgumentParser(description="score one conversation with IXC-2.5-Reward")
    p.add_argument("--ckpt", required=True, nargs="+", help="reward model dir(s); several are averaged")
    p.add_argument("--conv", required=True, help='JSON file: [{"role": "user", "content": ...}, ...]')
    p.add_argument("--image", nargs="*", default=[], help="image or video path(s), in placeholder order")
    p.add_argument("--hd-num", type=data.positive_int, default=24)
    p.add_argument("--max-length", type=data.positive_int, default=16384)
    add_device_args(p)
    a = p.parse_args(argv)
    try:
        conversation = json.loads(Path(a.conv).read_text())
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"cannot read conversation {a.conv}: {e}")
    rms = [RewardModel.from_pretrained(c, **device_kwargs(a)) for c in a.ckpt]
    scores = [rm.get_score(conversation, a.image, a.max_length, a.hd_num) for rm in rms]
    print(f"{sum(scores) / len(scores):.6f}")


if __name__ == "__main__":
    data.run_cli(main)
