"""Vision path of IXC-2.5: image/video -> HD tiles -> CLIP ViT -> 2x2 merge + separators -> projector.

Key names follow the checkpoint: `vit.vision_tower.vision_model.*` (Hugging Face CLIPVisionModel naming, including
its `pre_layrnorm` spelling), `vision_proj.{0,2}`, and the separators `plora_glb_GN` / `plora_sub_GN` that the
top-level model owns (official build_mlp.py, ixc_utils.py). The crop size comes from the vision config (560 for
the real model), so the same code serves the tiny built-in world.
"""
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from data import IMAGE_PLACEHOLDER, VIDEO_SUFFIXES, reward_template

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_MAX_FRAMES = 32
FRAME_HEADER = 40  # px of white above each video frame, holding its "<IMAGE k>" label


@dataclass
class VisionConfig:
    """Hugging Face `CLIPVisionConfig` field names; defaults are CLIP ViT-L/14 at 560 px (IXC-2.5)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 560
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})

    @property
    def grid(self):  # patches per side of one crop
        return self.image_size // self.patch_size


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), no mask: every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"vision_config.hidden_act {cfg.hidden_act!r} is not supported; expected 'quick_gelu'")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + 1, cfg.hidden_size)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


def sincos_position_embedding(grid, dim, amplitude=1.0):
    """[grid*grid + 1, dim] fixed 2-D sin-cos table (MAE, He et al. 2021, Eq. of Vaswani et al. per axis), CLS row 0.
    For a ViT trained from scratch: CLIP's learned table starts at N(0, 0.02), which the patch features soon
    outgrow a hundredfold, so a tower trained from scratch forgets where each patch is."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    ang_y, ang_x = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    table = torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)
    table = torch.cat([torch.zeros(1, 4 * q, dtype=torch.float64), table])
    return amplitude * F.pad(table, (0, dim - 4 * q)).float()


class CLIPVisionTransformer(nn.Module):
    """`vision_model`: the official feature is the last block's output, before `post_layernorm` (never applied, so
    not built; its stored weights are skipped at load), with the CLS token dropped."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:]


class CLIPVisionTower(nn.Module):
    """`vit`: wraps `vision_tower.vision_model` so the checkpoint keys load unchanged."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixels):
        return self.vision_tower.vision_model(pixels)


def build_vision_proj(vision_hidden, hidden):
    """`vision_proj`: Linear(4C -> D) + GELU(erf) + Linear(D -> D), on every merged token, separators included."""
    return nn.Sequential(nn.Linear(4 * vision_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))


# ----------------------------------------------------------------------------------------------------------------
# HD transform (ixc_utils.py's Image_transform; training: R560_HD18_Identity_transform), video strips (Video_transform)


def open_image(path):
    """A path or PIL image -> RGB PIL image, with errors that name the file."""
    if isinstance(path, Image.Image):
        return path.convert("RGB")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: not a valid image file ({e})") from None


def _pad_bottom(img, crop):
    w, h = img.size
    canvas = Image.new("RGB", (w, int(math.ceil(h / crop) * crop)), (255, 255, 255))
    canvas.paste(img, (0, 0))
    return canvas


def hd_columns(width, height, hd_num, crop=560, train=False):
    """Crop columns s of the landscape-oriented image: the largest s with s * ceil(s / ratio) <= hd_num, never
    more than ceil(width / crop) (1.5 x width for the training variant)."""
    width, height = max(width, height), min(width, height)
    ratio = width / height
    s = 1
    while s * math.ceil(s / ratio) <= hd_num:
        s += 1
    return min(math.ceil((1.5 if train else 1.0) * width / crop), max(s - 1, 1)), ratio


def hd_grid(width, height, hd_num, crop=560, train=False):
    """(rows, cols) of crops that hd_transform produces, from the image size alone (for batching by length)."""
    s, ratio = hd_columns(width, height, hd_num, crop, train)
    rows = math.ceil(int(int(crop * s) / ratio) / crop)
    return (s, rows) if width < height else (rows, s)


def hd_transform(img, hd_num, crop=560, train=False):
    """Official `Image_transform`: resize (bilinear) to s crops wide, keep the aspect ratio, pad with white to whole
    crops; portrait images are handled transposed, so their padding lands on the right."""
    transposed = img.width < img.height
    if transposed:
        img = img.transpose(Image.TRANSPOSE)
    s, ratio = hd_columns(img.width, img.height, hd_num, crop, train)
    new_w = int(crop * s)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    if train:  # R560_HD18_Identity_transform pads centred
        tar = int(math.ceil(new_h / crop) * crop)
        canvas = Image.new("RGB", (new_w, tar), (255, 255, 255))
        canvas.paste(img, (0, (tar - new_h) // 2))
        img = canvas
    else:
        img = _pad_bottom(img, crop)
    return img.transpose(Image.TRANSPOSE) if transposed else img


def video_transform(img, crop=560):
    """Official `Video_transform`: short side to one crop, long side padded at its end to whole crops (hd_num unused)."""
    transposed = img.width < img.height
    if transposed:
        img = img.transpose(Image.TRANSPOSE)
    ratio = img.width / img.height
    img = img.resize((int(crop * ratio), crop), Image.BILINEAR).transpose(Image.TRANSPOSE)
    img = _pad_bottom(img, crop)
    return img if transposed else img.transpose(Image.TRANSPOSE)


def frames_to_strip(frames, crop=560):
    """Official `frame2img`: frames resized to long side 2 crops, stacked (landscape: vertically) with a white
    40-px header carrying "<IMAGE k>", 10-px gaps and 2-px black separator lines. The official font is SimHei.ttf
    (downloaded at run time); we use PIL's built-in font, so label pixels differ (golden video_case says the same)."""
    frames = [f.convert("RGB") for f in frames]
    long_side = 2 * crop
    resized = []
    for f in frames:
        w, h = f.size
        scale = w / h  # divided (not multiplied by h / w) as upstream: the two can round 1 px apart
        size = (long_side, int(long_side / scale)) if w > h else (int(long_side * scale), long_side)
        resized.append(f.resize(size, Image.BILINEAR))
    landscape = frames[-1].width > frames[-1].height  # the official code decides on the last frame
    font = ImageFont.load_default()
    if landscape:
        W, H = max(f.width for f in resized), sum(f.height + 10 + FRAME_HEADER for f in resized)
    else:
        W, H = sum(f.width + 10 for f in resized), max(f.height for f in resized) + FRAME_HEADER
    strip = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(strip)
    at = 0
    for i, f in enumerate(resized):
        last = i + 1 == len(resized)
        if landscape:
            strip.paste(f, (0, FRAME_HEADER + at))
            draw.text((0, at), f"<IMAGE {i}>", font=font, fill="black")
            if not last:
                y = FRAME_HEADER + at + f.height + 5
                draw.line([(0, y), (W, y)], fill="black", width=2)
            at += f.height + 10 + FRAME_HEADER
        else:
            strip.paste(f, (at, FRAME_HEADER))
            draw.text((at, 0), f"<IMAGE {i}>", font=font, fill="black")
            if not last:
                draw.line([(at + f.width + 5, 0), (at + f.width + 5, H)], fill="black", width=2)
            at += f.width + 10
    return strip


def sample_frame_indices(n_frames, fps, max_frames=VIDEO_MAX_FRAMES):
    """About one frame per second from frame 0; more than `max_frames` are thinned to int(i * n / (max + 1))."""
    idx = list(range(0, n_frames, max(int(round(float(fps))), 1)))
    if len(idx) > max_frames:
        step = len(idx) / (max_frames + 1)
        idx = [idx[int(i * step)] for i in range(max_frames)]
    return idx


def load_video_frames(path, max_frames=VIDEO_MAX_FRAMES):
    """Frames of a video file (decoded with PyAV) or of a folder of frame images (sorted by name, taken as 1 fps)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
        if not files:
            raise ValueError(f"video frame folder has no images: {path}")
        return [open_image(files[i]) for i in sample_frame_indices(len(files), 1, max_frames)]
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        import av
    except ImportError:
        raise ImportError(f"reading the video {path} needs the optional package PyAV: pip install av "
                          "(or pass a folder of frame images instead)") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [f.to_image() for f in container.decode(stream)]
            fps = float(stream.average_rate or 1)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot decode video {path}: {e}") from None
    return [frames[i] for i in sample_frame_indices(len(frames), fps, max_frames)]


def to_pixels(img):
    """PIL -> normalised [1, 3, H, W] float32 (ToTensor + Normalize with the CLIP mean/std)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def load_visual(item, hd_num, crop=560, train=False):
    """An image path / PIL image / video path / frame folder / ready [1,3,H,W] tensor -> HD pixel tensor."""
    if torch.is_tensor(item):
        return item
    if isinstance(item, (str, Path)) and (Path(item).suffix.lower() in VIDEO_SUFFIXES or Path(item).is_dir()):
        return to_pixels(video_transform(frames_to_strip(load_video_frames(item), crop), crop))
    return to_pixels(hd_transform(open_image(item), hd_num, crop, train))


# ----------------------------------------------------------------------------------------------------------------
# ViT features -> merged tokens with separators (build_mlp.py's CLIPVisionTower.forward, the remote code's img2emb)


def n_image_tokens(h, w, grid):
    m = grid // 2
    return (h * w + 1) * m * m + 1 + (h + 1) * m


def sample_length(tok, sample, crop, grid, hd_num):
    """Tokens of a data sample (a preference pair: its longer side) without running the model, for the token-budget
    batcher: image tokens from the image size, text under the reward template."""
    n_img = 0
    hd = 6 if len(sample["images"]) > 1 else hd_num
    for im in sample["images"]:
        if Path(im).suffix.lower() in VIDEO_SUFFIXES or Path(im).is_dir():
            n_img += n_image_tokens(32, 1, grid)  # an upper bound; the exact strip is built at load time
        else:
            try:
                with Image.open(im) as f:  # the header is enough for the size
                    n_img += n_image_tokens(*hd_grid(*f.size, hd, crop), grid)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {im}: not a valid image file ({e})") from None
    convs = [sample["chosen"], sample["rejected"]] if "chosen" in sample else [sample["conversation"]]
    text = max(len(tok.encode(reward_template(c).replace(IMAGE_PLACEHOLDER, ""))) for c in convs)
    return n_img + text


def hd_views(pixels, crop):
    """[1,3,hC,wC] -> [1 + h*w, 3, C, C]: the bicubic global view first, then the crops in row-major order."""
    _, C, H, W = pixels.shape
    h, w = H // crop, W // crop
    if H != h * crop or W != w * crop:
        raise ValueError(f"HD pixel tensor {tuple(pixels.shape)} is not a whole number of {crop}-px crops")
    crops = pixels.reshape(C, h, crop, w, crop).permute(1, 3, 0, 2, 4).reshape(h * w, C, crop, crop)
    glb = F.interpolate(pixels.float(), size=(crop, crop), mode="bicubic", align_corners=False)
    return torch.cat([glb.to(crops.dtype), crops]), (h, w)


def merge_2x2(feats, grid):
    """[n, grid*grid, C] -> [n, grid/2, grid/2, 4C]; channel order (2a,2b), (2a,2b+1), (2a+1,2b), (2a+1,2b+1)."""
    n, _, C = feats.shape
    m = grid // 2
    return feats.reshape(n, m, 2, m, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(n, m, m, 4 * C)


def layout_tokens(feats, hw, glb_GN, sub_GN, grid):
    """One image's merged ViT features -> [global rows + sub_GN] [glb_GN] [stitched local rows + sub_GN]."""
    h, w = hw
    m = grid // 2
    merged = merge_2x2(feats, grid)
    D = merged.shape[-1]
    sub = sub_GN.reshape(1, 1, D).to(merged.dtype)
    glb = torch.cat([merged[0], sub.expand(m, 1, D)], dim=1).reshape(-1, D)
    local = merged[1:].reshape(h, w, m, m, D).permute(0, 2, 1, 3, 4).reshape(h * m, w * m, D)
    local = torch.cat([local, sub.expand(h * m, 1, D)], dim=1).reshape(-1, D)
    tokens = torch.cat([glb, glb_GN.reshape(1, D).to(merged.dtype), local])
    assert tokens.shape[0] == n_image_tokens(h, w, grid)
    return tokens
