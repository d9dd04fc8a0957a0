"""Model behaviour: tokenizer canary, KV cache == full forward, batch invariance, and clear errors on bad input."""
import json
import shutil
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REAL_TOKENIZER, RTOL32, SCORE_ATOL, TINY, assert_close, needs_shared, randomize
from data import Tokenizer
from model import Config, InternLMXComposer2, KVCache
from reward import RewardModel

pytestmark = needs_shared


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(REAL_TOKENIZER)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok):
    """A tiny chat and a tiny reward checkpoint (same trunk) written by save_pretrained."""
    root = tmp_path_factory.mktemp("ckpt")
    chat = randomize(InternLMXComposer2(Config(**TINY, plora_rank=8)), seed=1)
    chat.tokenizer = tok
    chat.save_pretrained(root / "chat")
    rm = randomize(RewardModel(Config(**TINY, plora_rank=8, head="score")), seed=1)
    rm.tokenizer = tok
    rm.save_pretrained(root / "rm")
    return root


@pytest.fixture(scope="module")
def rm(ckpts):
    return RewardModel.from_pretrained(ckpts / "rm")


@pytest.fixture(scope="module")
def chat(ckpts):
    return InternLMXComposer2.from_pretrained(ckpts / "chat")


def img(tmp_path, name="a.png", size=(90, 70), colour=(200, 30, 30)):
    p = tmp_path / name
    Image.new("RGB", size, colour).save(p)
    return str(p)


def conv(answer, question="What is shown?"):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_tokenizer_canary_and_special_ids(tok):
    assert tok.encode("The quick brown fox jumps over the lazy dog.", False) == \
        [918, 4131, 14018, 38648, 34256, 1053, 410, 15810, 5718, 281]
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 2)
    # decoding ends with the slow tokenizer's clean-up, as transformers 4.33.2's InternLM2Tokenizer.decode does
    for text, want in [("Hello , world .", "Hello, world."), ("It 's fine ?", "It's fine?"), ("a ' b", "a'b"),
                       ("I do n't know !", "I don't know!")]:
        assert tok.decode(tok.encode(text, False)) == want
    assert (tok.reward_id, tok.eot_id, tok.sot_id) == (92527, 92542, 92543)
    for s, i in {"<s>": 1, "</s>": 2, "<unk>": 0, "[UNUSED_TOKEN_130]": 92527, "[UNUSED_TOKEN_145]": 92542,
                 "[UNUSED_TOKEN_146]": 92543}.items():
        assert tok.encode(s, add_special_tokens=False) == [i], s
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_save_load_roundtrip(ckpts, rm, tmp_path):
    rm.save_pretrained(tmp_path / "again")
    a, b = load_file(str(ckpts / "rm" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "again").glob("*.tmp"))


def test_kv_cache_decoding_equals_full_forward(chat, tmp_path):
    """Prefill + one token at a time with the cache gives the logits of one full forward, image tokens included."""
    e, m = chat.prepare("<ImageHere>Describe this picture in detail please.", [img(tmp_path)], hd_num=4)
    with torch.no_grad():
        full = chat(e[None], m[None])
        cache = KVCache(chat.cfg, 1, e.shape[0], chat.dtype, chat.device)
        split = e.shape[0] - 6
        steps = [chat(e[None, :split], m[None, :split], cache=cache)]
        for t in range(split, e.shape[0]):
            steps.append(chat(e[None, t:t + 1], m[None, t:t + 1], cache=cache))
    assert_close(torch.cat(steps, 1), full, rtol=RTOL32, what="cached logits")


def test_repetition_penalty_against_a_naive_loop(chat):
    """Greedy decoding with HF's repetition penalty, recomputed from scratch at every step: the seen set is BOS (the
    input_ids transformers 4.33 starts from when generating from embeddings) plus every generated token."""
    e, m = chat.prepare("Name three colours")
    penalty, want = 0.05, []   # below 1 it favours seen tokens, so that BOS and repeats decide the argmax
    with torch.no_grad():
        for _ in range(8):
            ids = torch.tensor(want, dtype=torch.long)
            x = torch.cat([e, chat.model.tok_embeddings(ids)])[None]
            logits = chat(x, torch.cat([m, torch.zeros(len(want), dtype=torch.bool)])[None])[0, -1].clone()
            for tok in {chat.cfg.bos_token_id, *want}:
                logits[tok] = logits[tok] / penalty if logits[tok] > 0 else logits[tok] * penalty
            want.append(int(logits.argmax()))
        got = chat.generate(e[None], m[None], max_new_tokens=8, repetition_penalty=penalty, stop_ids=[-1])
        plain = chat.generate(e[None], m[None], max_new_tokens=8, stop_ids=[-1])
    assert got[0].tolist() == want and plain[0].tolist() != want


def test_left_padded_generation_equals_unpadded(chat):
    """Greedy continuation of a left-padded batch equals each prompt generated alone (padding contract)."""
    prompts = ["Hi", "Tell me a long story about a cat and a dog"]
    alone, rows = [], []
    for p in prompts:
        e, m = chat.prepare(p)
        alone.append(chat.generate(e[None], m[None], max_new_tokens=5, stop_ids=[-1])[0])
        rows.append((e, m))
    L = max(e.shape[0] for e, _ in rows)
    pad = chat.model.tok_embeddings.weight[2]
    embeds = torch.stack([torch.cat([pad.expand(L - e.shape[0], -1), e]) for e, _ in rows])
    im_mask = torch.zeros(2, L, dtype=torch.bool)
    att = torch.stack([torch.cat([torch.zeros(L - e.shape[0]), torch.ones(e.shape[0])]) for e, _ in rows]).long()
    batched = chat.generate(embeds, im_mask, att, max_new_tokens=5, stop_ids=[-1])
    assert batched.tolist() == [a.tolist() for a in alone]


def test_best_of_n_cache_copy_equals_separate_prefills(chat):
    e, m = chat.prepare("Name three colours")
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    shared = chat.generate(e[None], m[None], max_new_tokens=6, temperature=1.0, n=3, generator=g1, stop_ids=[-1])
    separate = chat.generate(e[None].expand(3, -1, -1), m[None].expand(3, -1), max_new_tokens=6, temperature=1.0,
                             generator=g2, stop_ids=[-1])
    assert shared.tolist() == separate.tolist()


def test_get_scores_equals_get_score_and_ignores_batch_composition(rm, tmp_path):
    a = img(tmp_path)
    convs = [conv("A red square."), conv("Nothing at all, I cannot see images, sorry about that."), conv("Red.")]
    images = [[a], [], [a]]
    single = [rm.get_score(c, i) for c, i in zip(convs, images)]
    close = dict(rtol=RTOL32, atol=SCORE_ATOL)   # batched (padded) and single forwards: other shapes, other rounding
    assert_close(rm.get_scores(convs, images), single, **close, what="batch")
    assert_close(rm.get_scores(convs[::-1], images[::-1])[::-1], single, **close, what="reversed batch")
    one = rm.get_scores(convs[1:2], images[1:2])
    assert isinstance(one, float)   # a bare float, as upstream
    assert_close(one, single[1], **close, what="batch of one")
    assert_close(rm.score_list(convs[1:2], images[1:2]), single[1:2], **close, what="score_list")
    ranking, scores = rm.rank(convs, images, return_logits=True)
    assert ranking == sorted(range(3), key=lambda i: -single[i])
    assert_close(scores, single, **close, what="rank scores")


def test_api_takes_arguments_in_the_official_positional_order(rm, tmp_path):
    """Upstream: get_score(conv, images, max_length, hd_num, apply_template); compare(..., max_length, hd_num,
    return_logits, apply_template). Swapped, max_length would be 1: its truncation warning fails the test."""
    a = img(tmp_path, size=(700, 300))
    c1, c2 = conv("A red square."), conv("Nothing at all.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s1 = rm.get_score(c1, [a], 16384, 1)
        assert s1 == rm.get_score(c1, [a], hd_num=1) != rm.get_score(c1, [a], hd_num=4)
        s2 = rm.get_score(c2, [a], 16384, 1)
        assert rm.compare(c1, [a], c2, [a], 16384, 1, True, True) == (s1 > s2, [s1, s2])
        close = dict(rtol=RTOL32, atol=SCORE_ATOL)
        assert_close(rm.rank([c1, c2], [[a], [a]], 16384, 1, True, True)[1], [s1, s2], **close, what="rank")
        assert_close(rm.get_scores([c1, c2], [[a], [a]], 16384, 1), [s1, s2], **close, what="get_scores")
    with pytest.raises(TypeError, match="one list of paths per conversation"):
        rm.get_score(c1, a)


def test_truncation_warns_when_reward_token_is_cut(rm):
    with pytest.warns(UserWarning, match="reward token is cut off"):
        rm.get_score(conv("word " * 50), max_length=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rm.get_score(conv("short"), max_length=100)


@pytest.mark.parametrize("problem, match", [
    ("missing", "missing: score.weight"),
    ("unexpected", "unexpected: model.extra.weight"),
    ("shape", "wrong shape: model.norm.weight"),
])
def test_checkpoint_key_problems_are_named(ckpts, tmp_path, problem, match):
    d = tmp_path / "bad"
    shutil.copytree(ckpts / "rm", d)
    state = load_file(str(d / "model.safetensors"))
    if problem == "missing":
        del state["score.weight"]
    elif problem == "unexpected":
        state["model.extra.weight"] = torch.zeros(2)
    else:
        state["model.norm.weight"] = torch.zeros(3)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        RewardModel.from_pretrained(d)


def test_ignored_upstream_keys_load(ckpts, tmp_path):
    """The chat checkpoint's lora_sft/dpo/web tensors and CLIP's post_layernorm are accepted and unused."""
    d = tmp_path / "extra"
    shutil.copytree(ckpts / "chat", d)
    state = load_file(str(d / "model.safetensors"))
    state["model.layers.0.attention.wqkv.lora_web_A.weight"] = torch.ones(512, 64)
    state["vit.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(32)
    save_file(state, str(d / "model.safetensors"))
    InternLMXComposer2.from_pretrained(d)


def test_bad_checkpoint_files(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        RewardModel.from_pretrained(tmp_path / "nope")
    d = tmp_path / "pickle"
    d.mkdir()
    shutil.copy(ckpts / "rm" / "config.json", d)
    (d / "pytorch_model-00001-of-00003.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="refs/pr/1"):
        RewardModel.from_pretrained(d)
    d = tmp_path / "truncated"
    shutil.copytree(ckpts / "rm", d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        RewardModel.from_pretrained(d)
    d = tmp_path / "index"
    shutil.copytree(ckpts / "rm", d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"score.weight": "model-2.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-2.safetensors"):
        RewardModel.from_pretrained(d)
    d = tmp_path / "config"
    shutil.copytree(ckpts / "rm", d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        RewardModel.from_pretrained(d)
    cfg["hidden_size"], cfg["rope_scaling"] = 64, {"type": "yarn", "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_scaling.*yarn.*linear"):
        RewardModel.from_pretrained(d)


def test_bad_inputs_name_the_problem(rm, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        rm.get_score(conv("x"), [str(tmp_path / "nothere.png")])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        rm.get_score(conv("x"), [str(tmp_path / "empty.png")])
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        rm.get_score(conv("x"), [str(tmp_path / "corrupt.jpg")])
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        rm.get_score([{"role": "robot", "content": "hi"}])


def test_placeholder_mismatch_warns_and_splices_as_upstream(rm, tmp_path):
    """Upstream only warns: after text part i comes image i if there is one (the last part included, so an extra
    image lands after the reward token), images beyond the parts are dropped, parts beyond the images are text."""
    a, b = img(tmp_path), img(tmp_path, "b.png", colour=(0, 0, 255))
    n_a = int(rm.encode(conv("x"), [a], hd_num=6)[1].sum())   # several images force hd_num 6
    with pytest.warns(UserWarning, match="1 <ImageHere> placeholder"):
        e, m = rm.encode(conv("x", "Image1 <ImageHere>; Image2"), [a, b])
    assert m[-1] and int(m.sum()) == 2 * n_a and not m[:3].any()
    with pytest.warns(UserWarning, match="0 <ImageHere> placeholder"):
        e, m = rm.encode(conv("x"), [a, b])
    assert m[-1] and not m[0] and int(m.sum()) == n_a and e.shape[0] == rm.encode(conv("x"))[0].shape[0] + n_a
    with pytest.warns(UserWarning, match="2 <ImageHere> placeholder"):
        e, m = rm.encode(conv("x", "<ImageHere>Image1 ; Image2<ImageHere>"), [a])
    assert int(m.sum()) == int(rm.encode(conv("x"), [a])[1].sum()) and not m[-1]


def test_several_images_force_hd_num_6(rm, tmp_path):
    big = img(tmp_path, "big.png", size=(500, 120))  # 9 crops wide at hd_num 24 with 56-px crops, 6 at hd_num 6
    e1, _ = rm.encode(conv("x", "<ImageHere><ImageHere>"), [big, big], hd_num=24)
    e2, _ = rm.encode(conv("x", "<ImageHere><ImageHere>"), [big, big], hd_num=6)
    e3, _ = rm.encode(conv("x"), [big], hd_num=24)
    assert e1.shape == e2.shape and e3.shape[0] > e1.shape[0] // 2


def test_dynamic_ntk_base_persists_as_upstream(rm):
    """Upstream rebuilds its RoPE cache only when a call is longer than the cache, with the base of that length, and
    keeps it: after a 50-token call (max_position_embeddings 32 here), every call uses the 50-token base."""
    import copy
    fresh = copy.deepcopy(rm)
    fresh.cfg.max_position_embeddings = fresh.model.rope_len = 32
    used = copy.deepcopy(fresh)
    x = torch.randn(1, 50, fresh.cfg.hidden_size)
    with torch.no_grad():
        short_fresh = fresh(x[:, :20])
        used(x)
        assert used.model.rope_len == 50
        short_used = used(x[:, :20])
        used(x[:, :40])
        assert used.model.rope_len == 50 and torch.equal(used(x[:, :20]), short_used)
        assert not torch.allclose(short_used, short_fresh, atol=1e-3)
        fresh.model.rope_len = 50   # the state is all there is to it
        # the same kernels on the same shapes: exact in practice (observed 0), so the old tight bound stays
        assert_close(fresh(x[:, :20]), short_used, rtol=0, atol=1e-6, what="fresh model at rope_len 50")


def test_dynamic_ntk_only_beyond_max_position(rm):
    from model import rope_inv_freq
    cfg = rm.cfg
    assert torch.equal(rope_inv_freq(cfg, cfg.max_position_embeddings), rope_inv_freq(cfg, 10))
    longer = rope_inv_freq(cfg, 2 * cfg.max_position_embeddings)
    base = cfg.rope_theta * (2.0 * 2 - 1) ** (cfg.head_dim / (cfg.head_dim - 2))
    torch.testing.assert_close(longer, 1.0 / base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
