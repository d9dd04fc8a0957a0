"""Parity with the official implementation: every case of ../shared/golden (spec: golden/README.md)."""
import json
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ASSETS, GOLDEN, RTOL32, SCORE_ATOL, assert_close, needs_shared
from data import DEFAULT_META, Tokenizer, chat_prompt, reward_template, tokenize_segments
from model import InternLMXComposer2
from reward import RewardModel
from vision import frames_to_strip, hd_grid, hd_transform, n_image_tokens, open_image, sample_frame_indices, video_transform

pytestmark = needs_shared
PIXEL_RTOL = 1e-6  # no reduction: 8-bit pixels from PIL, then 3 float32 roundings per value (observed exact)


@pytest.fixture(scope="module")
def cases():
    return json.loads((GOLDEN / "cases.json").read_text())


@pytest.fixture(scope="module")
def tensors():
    return load_file(str(GOLDEN / "tensors.safetensors"))


@pytest.fixture(scope="module")
def rm():
    return RewardModel.from_pretrained(GOLDEN / "ckpt")


@pytest.fixture(scope="module")
def chat_model():
    return InternLMXComposer2.from_pretrained(GOLDEN / "chat_ckpt")


def paths(images):
    return [str(ASSETS / p) for p in images]


def reward_case_ids():
    return [c["id"] for c in json.loads((GOLDEN / "cases.json").read_text())["reward_cases"]] \
        if GOLDEN.is_dir() else []


@pytest.mark.parametrize("case_id", reward_case_ids())
def test_reward_case(case_id, cases, tensors, rm):
    c = next(c for c in cases["reward_cases"] if c["id"] == case_id)
    kw, want = c["kwargs"], c["official_return"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings are tested on their own
        if c["api"] == "get_score":
            got = [rm.get_score(c["conversation"], paths(c["images"]), **kw)]
            convs, image_lists = [c["conversation"]], [c["images"]]
        else:
            convs, image_lists = c["conversations"], c["images"]
            images = [paths(i) for i in image_lists]
            if c["api"] == "get_scores":
                got = rm.get_scores(convs, images, **kw)
            elif c["api"] == "compare":
                result, got = rm.compare(convs[0], images[0], convs[1], images[1], **kw)
                assert result == want["result"]
            elif c["api"] == "rank":
                ranking, got = rm.rank(convs, images, **kw)
                assert ranking == want["ranking"]
        assert_close(got, want["scores"] if "scores" in want else [want["score"]], rtol=RTOL32, atol=SCORE_ATOL,
                     what=f"{case_id} scores")
    # the exact token ids and image-token counts of every official apply_chat_template call
    for seq, conv, imgs in zip(c["sequences"], convs, image_lists):
        text = reward_template(conv) if kw.get("apply_template", True) else conv
        hd = 6 if len(imgs) > 1 else kw.get("hd_num", 24)
        segs = tokenize_segments(rm.tokenizer, text, len(imgs))
        want_segs = seq["segments"]
        # upstream stops tokenizing once an image pushes the length past max_length (the reference outputs): a prefix
        assert len(segs) == len(want_segs) or (len(segs) > len(want_segs) and seq["untruncated_length"] > kw["max_length"])
        for got_seg, want_seg in zip(segs, want_segs):
            if want_seg["type"] == "text":
                assert got_seg == want_seg["ids"]
            else:
                img = hd_transform(open_image(ASSETS / imgs[got_seg]), hd, 560)
                h, w = img.height // 560, img.width // 560
                assert [1, 3, img.height, img.width] == want_seg["pixel_shape"]
                assert [h, w] == want_seg["grid_hw"] and n_image_tokens(h, w, 40) == want_seg["n_tokens"]


def test_reward_hidden_states_and_tensors(cases, tensors, rm):
    """Decoder input, every layer's residual stream, final-normed hidden and score at every position."""
    c = next(c for c in cases["reward_cases"] if c["id"] == "text_multiturn")
    embeds, im_mask = rm.encode(c["conversation"])
    assert_close(embeds[None], tensors["text_multiturn.forward0.inputs_embeds"], rtol=0, what="inputs_embeds (lookup)")
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o)) for layer in rm.model.layers]
    with torch.no_grad():
        scores = rm(embeds[None], im_mask[None])
    for h in hooks:
        h.remove()
    assert_close(torch.stack(outs), tensors["text_multiturn.forward0.layer_outputs"], rtol=RTOL32, what="layer outputs")
    assert_close(scores, tensors["text_multiturn.forward0.score_all_positions"], rtol=RTOL32, atol=SCORE_ATOL,
                 what="scores at every position")
    for c in cases["reward_cases"]:
        for k, call in enumerate(c["forward_calls"]):
            name = f"{c['id']}.forward{k}.pooled_score"
            assert call["pooled_scores_f32"] == pytest.approx(tensors[name].flatten().tolist(), abs=1e-7)


def test_image_path_tensors(cases, tensors, rm):
    """HD pixels, ViT features (no CLS, no post-layernorm), merged tokens with separators, projected embeddings."""
    pre = "panda_store_tensors.image0."
    img = hd_transform(open_image(ASSETS / "images/ixc/panda.jpeg"), 24, 560)
    from vision import hd_views, layout_tokens, to_pixels
    pixels = to_pixels(img)
    assert_close(pixels, tensors[pre + "hd_pixels"], rtol=PIXEL_RTOL, what="HD pixels")
    with torch.no_grad():
        views, hw = hd_views(pixels, 560)
        feats = rm.vit(views)
        assert_close(feats, tensors[pre + "vit_last_hidden_no_cls"], rtol=RTOL32, what="ViT features")
        merged = layout_tokens(feats, hw, rm.plora_glb_GN, rm.plora_sub_GN, 40)
        assert_close(merged[None], tensors[pre + "merged_pre_proj"], rtol=RTOL32, what="merged tokens")
        emb = rm.encode_images([pixels])[0]
        assert_close(emb[None], tensors[pre + "img_embeds"], rtol=RTOL32, what="projected image embeddings")
    c = next(c for c in cases["reward_cases"] if c["id"] == "panda_store_tensors")
    with torch.no_grad():
        e, m = rm.encode(c["conversation"], paths(c["images"]))
        assert_close(rm(e[None], m[None]), tensors["panda_store_tensors.forward0.score_all_positions"], rtol=RTOL32,
                     atol=SCORE_ATOL, what="scores at every position")
    runs = [[int(v), 0] for v in m[:1]]
    for v in m.tolist()[1:]:
        runs[-1][1] += 1 if runs[-1][0] == int(v) else 0
        if runs[-1][0] != int(v):
            runs.append([int(v), 1])
    runs[0][1] += 1
    assert runs == c["forward_calls"][0]["im_mask_runs"][0]


@pytest.mark.parametrize("i", range(2))
def test_chat_case(i, cases, tensors, chat_model):
    c = cases["chat_cases"][i]
    meta = DEFAULT_META if c["use_meta"] else None
    if meta is not None:
        assert c["meta_instruction"] == DEFAULT_META
    embeds, im_mask = chat_model.prepare(chat_prompt(c["query"], c["history"], meta), paths([c["image"]]), c["hd_num"])
    assert embeds.shape[0] == c["prompt_length"]
    with torch.no_grad():
        logits = chat_model(embeds[None], im_mask[None])[0]
    want = tensors[c["logits_tensor"]].reshape(-1, logits.shape[-1])
    assert_close(logits[-want.shape[0]:], want, rtol=RTOL32, what="logits")
    assert logits[-5:].argmax(-1).tolist() == c["argmax_last5"]
    assert logits[-5:].topk(10).indices.tolist() == c["top10_last5"]["ids"]
    new = chat_model.generate(embeds[None], im_mask[None], max_new_tokens=8, stop_ids=[2, 92542])
    assert new[0].tolist() == c["greedy_new_ids"] == c["greedy_no_cache_ids"]
    response, history = chat_model.chat(c["query"], paths([c["image"]])[0], c["history"], use_meta=c["use_meta"],
                                        max_new_tokens=8)
    assert response == c["chat_call"]["response"] and history[-1] == (c["query"], response)


def test_tokenizer_cases(cases):
    tok = Tokenizer(GOLDEN / "ckpt" / "tokenizer.model")
    tc = cases["tokenizer_cases"]
    for c in tc["cases"]:
        assert tok.encode(c["text"]) == c["ids_add_special_true"], c["text"]
        assert tok.encode(c["text"], add_special_tokens=False) == c["ids_add_special_false"], c["text"]
    assert tok.encode("[UNUSED_TOKEN_145]\n</s>[UNUSED_TOKEN_130]", False) == tc["reward_suffix_ids"]


def test_image_transform_cases(cases):
    for c in cases["image_transform_cases"]:
        img = open_image(ASSETS / c["image"])
        assert list(img.size) == c["orig_wh"]
        out = hd_transform(img, c["hd_num"], 560)
        h, w = out.height // 560, out.width // 560
        assert list(out.size) == c["out_wh"] and [h, w] == c["grid_hw"], c
        assert list(hd_grid(*c["orig_wh"], c["hd_num"], 560)) == c["grid_hw"]
        assert n_image_tokens(h, w, 40) == c["n_image_tokens"]


def test_video_case(cases):
    v = cases["video_case"]
    idx = sample_frame_indices(v["n_frames"], v["avg_fps"])
    assert idx == v["sampled_frame_indices"]
    frames = [Image.new("RGB", tuple(v["frame_wh"]), (i * 40, 90, 200)) for i in range(len(idx))]
    strip = frames_to_strip(frames, 560)
    assert list(strip.size) == v["frame2img_strip_wh"]
    out = video_transform(strip, 560)
    h, w = out.height // 560, out.width // 560
    assert list(out.size) == v["video_transform_wh"] and [h, w] == v["grid_hw"]
    assert n_image_tokens(h, w, 40) == v["n_image_tokens"]


def test_video_frame_sizes_round_as_upstream():
    """Upstream computes the resized side as int(1120 / (w / h)) (landscape) or int(1120 * (w / h)) (portrait); the
    mathematically equal int(1120 * h / w) differs by a pixel for these sizes (960 vs 959, 480 vs 479, ...)."""
    for (w, h), side in [((560, 480), 959), ((700, 300), 479), ((470, 700), 751)]:
        strip = frames_to_strip([Image.new("RGB", (w, h), "red")] * 2, 560)
        assert (strip.height == 2 * (side + 50)) if w > h else (strip.width == 2 * (side + 10))


def test_video_file_decodes_to_official_frames(cases):
    av = pytest.importorskip("av", reason="PyAV (optional video decoder) not installed")
    from vision import load_video_frames
    v = cases["video_case"]
    frames = load_video_frames(ASSETS / v["video"])
    assert len(frames) == v["n_sampled"] and list(frames[0].size) == v["frame_wh"]
