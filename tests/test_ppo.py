"""PPO pieces against naive references, and the padding contract of the rollout."""
import argparse
import json
import xml.etree.ElementTree as ET

import pytest
import torch

import figures
import batching
import data
import ppo
from conftest import EPS32, RTOL32, SCORE_ATOL, assert_close, randomize
from model import InternLMXComposer2
from reward import RewardModel
from test_train import world  # noqa: F401  (the small-world fixture)

CPU = torch.device("cpu")
SVG = "{http://www.w3.org/2000/svg}"


def naive_gae(rewards, values, lengths, gamma, lam):
    """The textbook double loop, one row at a time, over its valid tokens only."""
    adv = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                v_next = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                total += (gamma * lam) ** (k - t) * delta
            adv[b, t] = total
    return adv


def test_gae_equals_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    lengths = [7, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
        adv, ret = ppo.gae(rewards * mask, values, mask, gamma, lam)
        want = naive_gae(rewards, values, lengths, gamma, lam)
        assert_close(adv, want, rtol=RTOL32, what="advantages")  # float32 recursion against float64 sums
        assert_close(ret, (want + values) * mask, rtol=RTOL32, what="returns")


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = ppo.whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    want = (valid - valid.mean()) / (valid.var(unbiased=False) + 1e-8).sqrt()
    torch.testing.assert_close(w[mask.bool()], want)
    assert (w[~mask.bool()] == 0).all()


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, "k1"), logp - ref)
    r = (ref - logp).exp()
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, "k3"), r - 1 - (ref - logp))
    assert (ppo.kl_penalty(logp, ref, "k3") >= 0).all()


def ratio_atol(ro):
    """The logged ratio is a token mean of exp(logp - old_logp) where the update recomputes the rollout's log-probs:
    exactly 1 where it replays the same kernels (observed), else off by an ulp or two of |logp| of either sign, which
    the mean averages: 2 EPS32 max|logp| (1.6e-6 here; an update whose temperature is off by 0.1% gives 1.2e-5)."""
    return 2 * EPS32 * ro.old_logp.abs().max().item()


def args(**kw):
    p = argparse.ArgumentParser()
    ppo.add_args(p)
    a = p.parse_args([])
    a.hd_num, a.token_budget, a.clip, a.max_new_tokens, a.rollout_chunk, a.kl_coef = 9, 4096, 1.0, 8, 4, 0.05
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.fixture(scope="module")
def roles(world):  # noqa: F811
    policy = InternLMXComposer2.from_pretrained(world / "sft")
    ref = InternLMXComposer2.from_pretrained(world / "sft").requires_grad_(False)
    rm = randomize(RewardModel.from_pretrained(world / "sft", head="score"), seed=3).requires_grad_(False)
    critic = randomize(RewardModel.from_pretrained(world / "sft", head="score"), seed=3)
    rows = data.read_sft(world / "world" / "sft_train.json")[:6]
    prompts = [(data.sft_prompt(r), r["images"], r) for r in rows]
    return policy, ref, rm, critic, prompts


def rollout(roles, **kw):
    policy, ref, rm, critic, prompts = roles
    a = args(**kw)
    n = a.rloo_k if a.algo == "rloo" else 1
    objectives = ppo.Roles(ppo.PolicyLogprobs(policy, a.temperature, CPU), ppo.PolicyLogprobs(ref, a.temperature, CPU),
                           ppo.CriticValues(critic, ppo.reward_norm(critic, a.normalize_reward), CPU),
                           [ppo.RewardScore(rm, "rm0", a.normalize_reward, CPU)])
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts) * n)]
    ro = ppo.collect_rollouts(objectives, prompts, a, CPU, generators)
    ro.prompt_len = [50] * len(ro)
    return a, ro


def update(roles, ro, a, opt, opt_v):
    policy, critic = roles[0], roles[3]
    norm = ppo.reward_norm(critic, a.normalize_reward)
    return ppo.ppo_update(ppo.PolicyLogprobs(policy, a.temperature, CPU), ppo.CriticValues(critic, norm, CPU), ro,
                          opt, opt_v, a, CPU, 1)


def test_first_minibatch_ratio_is_one_and_ref_equals_policy(roles):
    a, ro = rollout(roles, mini_batches=1, ppo_epochs=1)
    # policy == ref at the start, run on the same batch: exact in practice (observed 0), the old bound stays
    assert_close(ro.old_logp, ro.ref_logp, rtol=0, atol=1e-5, what="policy vs ref log-probs")
    ppo.compute_advantages(ro, a)
    policy, _, _, critic, _ = roles
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    opt_v = torch.optim.SGD([p for p in critic.parameters() if p.requires_grad], lr=0.0)
    stats = update(roles, ro, a, opt, opt_v)
    assert_close(stats["ratio"], 1.0, rtol=0, atol=ratio_atol(ro), what="ratio")
    assert_close(stats["approx_kl"], 0.0, rtol=0, atol=1e-6, what="approx_kl")  # second order: (d logp)^2 / 2


def test_logprobs_of_padded_batch_equal_each_alone(roles):
    a, ro = rollout(roles)
    policy = roles[0]
    together, _ = ppo.logprobs_of(policy, ppo.model_batch(policy, ro, "policy", CPU), a.temperature)
    for b, n in enumerate((3, 8, 5, 1, 8, 2)):  # unequal responses: the right padding is exercised too
        ro.mask[b, n:] = 0.0
    for b, n in enumerate(ro.lengths().tolist()):
        alone, _ = ppo.logprobs_of(policy, ppo.model_batch(policy, ro.rows([b]), "policy", CPU), a.temperature)
        assert_close(together[b, :n], alone[0, :n], rtol=RTOL32, what=f"row {b}")


def test_critic_value_at_reward_token_equals_rm_score(roles):
    """The critic starts as a copy of the reward model: on the reward-template sequence its last value is the score."""
    policy, ref, rm, critic, prompts = roles
    a, ro = rollout(roles)
    scores = ppo.reward_scores([critic], ro, CPU, normalize=False)
    torch.testing.assert_close(scores, ppo.reward_scores([rm], ro, CPU, normalize=False))


def test_missing_eos_is_penalised_and_score_sits_on_last_token(roles):
    a, ro = rollout(roles, max_new_tokens=3, missing_eos_penalty=1.5)
    raw = ppo.reward_scores([roles[2]], ro, CPU, normalize=False)
    for score, stopped, r in zip(ro.score.tolist(), ro.stopped.tolist(), raw.tolist()):
        # the same score the rollout computed, minus the penalty: the old tight bound stays
        assert_close(score, r - (0.0 if stopped else 1.5), rtol=0, atol=1e-5, what="penalised score")
    assert not ro.stopped.all()
    a.kl_coef, a.lam, a.gamma = 0.0, 1.0, 1.0
    ro.values = torch.zeros_like(ro.values)
    ppo.compute_advantages(ro, a)
    # with no KL, gamma = lambda = 1 and V = 0, every token's return is the final score
    for b, n in enumerate(ro.lengths().tolist()):
        assert_close(ro.returns[b, :n], torch.full((n,), ro.score[b].item()), rtol=0, atol=1e-5,
                     what="returns")  # sums of zeros and the score


def test_seeded_sampler_is_reproducible(roles):
    policy, _, _, _, prompts = roles
    q = [(p[2]["conversation"][-2]["content"], p[1]) for p in prompts[:3]]
    a1 = policy.answer(q, 9, 8, temperature=1.0, n=2, generator=torch.Generator().manual_seed(5))
    a2 = policy.answer(q, 9, 8, temperature=1.0, n=2, generator=torch.Generator().manual_seed(5))
    a3 = policy.answer(q, 9, 8, temperature=1.0, n=2, generator=torch.Generator().manual_seed(6))
    assert a1 == a2 and a1 != a3


def test_rloo_baseline_is_leave_one_out(roles):
    a, ro = rollout(roles, algo="rloo", rloo_k=2, kl_coef=0.0)
    assert len(ro) == 12 and ro.group[0] == ro.group[1] != ro.group[2]
    raw = ro.score.tolist()
    ppo.compute_advantages(ro, a)
    # before whitening each row's advantage is its score minus its sibling's: pairs are antisymmetric
    for i in range(0, 12, 2):
        d = raw[i] - raw[i + 1]
        if abs(d) > 1e-6:
            assert (ro.adv[i, 0] > ro.adv[i + 1, 0]) == (d > 0)


def test_critic_values_are_in_the_rewards_units(roles):
    """With reward normalisation the critic's values are (score - mean) / std, the units of the returns it
    regresses on; without it, the raw head."""
    critic = roles[3]
    mean, std = critic.cfg.reward_mean, critic.cfg.reward_std
    critic.cfg.reward_mean, critic.cfg.reward_std = 0.7, 2.5
    try:
        a, ro = rollout(roles, normalize_reward=True)
        raw = ppo.values_of(critic, ppo.model_batch(critic, ro, "critic", CPU))
        for b, n in enumerate(ro.lengths().tolist()):
            assert_close(ro.values[b, :n], (raw[b, :n] - 0.7) / 2.5, rtol=RTOL32, atol=SCORE_ATOL / 2.5,
                         what="normalised values")  # values are scores at every position, in the rollout's batches
        a, ro = rollout(roles, normalize_reward=False)
        for b, n in enumerate(ro.lengths().tolist()):
            assert_close(ro.values[b, :n], raw[b, :n], rtol=RTOL32, atol=SCORE_ATOL, what="raw values")
    finally:
        critic.cfg.reward_mean, critic.cfg.reward_std = mean, std


def test_reward_input_ends_like_the_template(roles, monkeypatch):
    """A response that stopped on </s> (not on end-of-turn) is scored as `answer [UNUSED_TOKEN_145] </s>
    [UNUSED_TOKEN_130]`, the reward template's ending, not with two </s>."""
    rm = roles[2]
    tok = rm.tokenizer
    seen = []
    monkeypatch.setattr(type(rm), "score_embedded", lambda self, rows: seen.append(rows) or torch.zeros(len(rows)))
    monkeypatch.setattr(type(rm), "splice_rows", lambda self, rows: [segments[-1] for segments, _ in rows])
    answer = tok.encode("The triangle is red.", add_special_tokens=False)
    ro = ppo.Rollout.start([answer + [tok.eos_id], answer + [tok.eot_id], answer], [True, True, False], 0,
                           [[[5]]] * 3, {"rm0": [[]] * 3}, [1] * 3, [None] * 3, [0, 1, 2])
    ppo.reward_scores([rm], ro, CPU, normalize=False)
    want = answer + [tok.eot_id] + tok.encode("\n</s>" + data.REWARD_TOKEN, add_special_tokens=False)
    assert [row.tolist() for row in seen[0]] == [want, want, want]


def test_update_runs_exactly_the_requested_mini_batches(roles, monkeypatch):
    """Seven samples in two mini-batches are two optimizer steps per epoch (4 + 3), not a third step on a
    remainder of one sample."""
    a, ro = rollout(roles, mini_batches=2, ppo_epochs=2)
    ro = ro.rows([0, 1, 2, 3, 4, 0, 1])
    ppo.compute_advantages(ro, a)
    policy, _, _, critic, _ = roles
    steps = []
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    opt_v = torch.optim.SGD([p for p in critic.parameters() if p.requires_grad], lr=0.0)
    monkeypatch.setattr(opt, "step", lambda: steps.append(1))
    update(roles, ro, a, opt, opt_v)
    assert len(steps) == 4


def test_logged_means_are_token_means_over_the_update(roles):
    """Statistics are token means over the whole update however the micro-batches split it. At the first step the
    ratio is 1, so the policy loss is minus the whitened advantage, whose token mean is exactly 0; averaging the
    micro-batches' means instead would weigh a 1-token response like an 8-token one."""
    a, ro = rollout(roles, mini_batches=1, ppo_epochs=1, token_budget=120)
    for b, n in enumerate((1, 8, 2, 8, 3, 8)):  # responses of unequal lengths: micro-batches of unequal tokens
        ro.mask[b, n:] = 0.0
    ro.old_logp, ro.ref_logp, ro.values = ro.old_logp * ro.mask, ro.ref_logp * ro.mask, ro.values * ro.mask
    ppo.compute_advantages(ro, a)
    lengths = (ro.lengths() + 50).tolist()
    assert len({sum(lengths[i] - 50 for i in b) for b in batching.token_budget_batches(lengths, 120, shuffle=False)}) > 1
    policy, _, _, critic, _ = roles
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    opt_v = torch.optim.SGD([p for p in critic.parameters() if p.requires_grad], lr=0.0)
    stats = update(roles, ro, a, opt, opt_v)
    # |token mean of -adv * ratio| <= max|adv| * (|ratio - 1| + tokens * EPS32): the ratio's noise, plus the rounding
    # of advantages whose token sum is exactly 0
    adv = ro.adv[ro.mask.bool()]
    bound = adv.abs().max().item() * (ratio_atol(ro) + len(adv) * EPS32)
    assert_close(stats["policy_loss"], 0.0, rtol=0, atol=bound, what="policy loss")


def test_policy_loss_is_eq3_on_hand_computed_values():
    """-min(r A, clip(r, 1 - 0.2, 1 + 0.2) A) per token, worked by hand: the clip binds only where it would let the
    objective gain from moving r outside [0.8, 1.2] (rows 3 and 5); elsewhere the unclipped term is the minimum."""
    ratio = torch.tensor([0.5, 1.0, 1.5, 1.5, 0.5])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])
    torch.testing.assert_close(ppo.policy_loss(ratio, adv, 0.2), torch.tensor([-0.5, 1.0, -1.2, 1.5, 0.8]))


def test_value_loss_is_eq4_on_hand_computed_values():
    """0.5 max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, -0.2, 0.2), V_old = 0.5, by hand:
    the clipped term wins when the clip holds V back from R (rows 1 and 2), never lowers the loss (row 3), and
    changes nothing inside the clip (row 4)."""
    v, old_v = torch.tensor([1.0, 0.0, 2.0, 0.6]), torch.full((4,), 0.5)
    returns = torch.tensor([1.0, 1.0, 0.0, 0.0])
    want = torch.tensor([0.5 * 0.3 ** 2, 0.5 * 1.0, 0.5 * 2.0 ** 2, 0.5 * 0.6 ** 2])
    torch.testing.assert_close(ppo.value_loss(v, old_v, returns, 0.2), want)


def polylines(svg):
    """Each <polyline> of an SVG as its list of (x, y) pixel points, in drawing order."""
    root = ET.fromstring(svg)
    return [[tuple(map(float, p.split(","))) for p in el.get("points").split()] for el in root.iter(f"{SVG}polyline")]


def texts(svg):
    return [el.text for el in ET.fromstring(svg).iter(f"{SVG}text")]


def fake_ppo_run(path, kl_coef, checks):
    """A PPO run directory as ppo.train leaves it: iteration lines, and at some iterations' start a held-out check
    (kl, score, heldout_right); `checks` are (kl, gold, proxy) in the order of time."""
    path.mkdir()
    lines = []
    for step, (kl, gold, proxy) in enumerate(checks):
        lines += [{"kl": kl, "score": proxy, "step": step + 1, "entropy": 0.1 + 0.01 * step},
                  {"step": step, "phase": "start", "kl": kl, "score": proxy, "heldout_right": gold}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (path / "summary.json").write_text(json.dumps({"stage": "ppo", "kl_coef": kl_coef}))
    return path


def test_overoptimisation_figure_joins_each_runs_points_in_order_of_kl(tmp_path):
    """Gao et al.'s figure from three runs whose KL does not grow monotonically in time: per run a gold (checker)
    and a proxy (reward model) line, each drawn through its points sorted by KL, on labelled axes with ticks."""
    runs = [fake_ppo_run(tmp_path / "a", 0.05, [(0.0, 0.41, 0.1), (1.2, 0.55, 0.6), (0.8, 0.58, 0.5), (2.0, 0.5, 0.9)]),
            fake_ppo_run(tmp_path / "b", 0.1, [(0.0, 0.41, 0.1), (0.5, 0.56, 0.4), (0.3, 0.5, 0.3)]),
            fake_ppo_run(tmp_path / "c", 0.0, [(0.0, 0.41, 0.1), (4.0, 0.45, 1.2), (2.5, 0.6, 1.0), (5.0, 0.4, 1.4)])]
    out = tmp_path / "fig.svg"
    figures.main(["overoptimisation", *map(str, runs), "--out", str(out)])
    svg = out.read_text()
    lines = polylines(svg)
    assert [len(line) for line in lines] == [4, 4, 3, 3, 4, 4]  # gold and proxy of each run, every check a point
    for line in lines:
        xs = [x for x, _ in line]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)  # in order of KL, not of time
    # sqrt(KL) on x: run c's points sit at sqrt(0, 2.5, 4, 5) along the axis, not at 0, 2.5, 4, 5
    x0, x_end = lines[4][0][0], lines[4][-1][0]
    assert (lines[4][1][0] - x0) / (x_end - x0) == pytest.approx((2.5 ** 0.5) / 5 ** 0.5, abs=0.01)
    # the gold line rises to its peak and falls (its y in pixels grows downwards), the proxy keeps rising
    gold_y, proxy_y = [y for _, y in lines[4]], [y for _, y in lines[5]]
    assert gold_y[1] < gold_y[0] and gold_y[1] < gold_y[2] < gold_y[3] and proxy_y == sorted(proxy_y, reverse=True)
    words = " ".join(texts(svg))
    for label in ("√KL to the reference", "√nats", "gold: checker", "proxy: reward-model score",
                  "--kl-coef 0.05 (a)", "--kl-coef 0.1 (b)", "--kl-coef 0.0 (c)"):
        assert label in words, label
    assert {"0", "1", "2"} <= set(texts(svg))  # tick values on the sqrt(KL) axis (max sqrt(5) = 2.24)


def test_overoptimisation_figure_names_a_run_without_checks(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "kl": 0.1, "score": 0.2}) + "\n")
    with pytest.raises(ValueError, match=f"no held-out checks .* {run}"):
        figures.overoptimisation_svg([run])


def test_learning_curves_have_labelled_axes_and_leave_out_restated_lines(tmp_path):
    """curves.svg: a panel per key, titled with the key, its axes labelled with what is plotted and its unit, tick
    values on both; PPO's held-out-check lines (which restate an iteration's KL and score) are not points."""
    run = fake_ppo_run(tmp_path / "a", 0.1, [(0.0, 0.41, 0.1), (1.2, 0.55, 0.6), (0.8, 0.58, 0.5), (2.0, 0.5, 0.9)])
    svg = figures.curves_svg(run / "metrics.jsonl", ["kl", "entropy", "absent"], "PPO: a", xlabel="PPO iteration")
    assert [len(line) for line in polylines(svg)] == [4, 4]  # one per key logged, each iteration once
    assert [x for x, _ in polylines(svg)[0]] == sorted(x for x, _ in polylines(svg)[0])
    words = texts(svg)
    for label in ("kl", "entropy", "PPO iteration", "KL to the reference (nats per response)",
                  "entropy (nats per token)", "1", "4"):
        assert label in words, label
