"""The world's checker, what a reader must trust: it plays the paper's annotators. Read top to bottom:

    is_correct(item, answer)    is the stated value right? (content, whatever the form)
    follows(item, answer)       is the item's one instruction followed? (IFEval's strict mode; None: it has none)
    failure_kind(item, answer)  None when the answer is right and follows, else what is wrong with it
    judge(items, answers)       the shares of the above over a set, overall and per kind and family
    eval_policy(model, items)   a policy's greedy answers, judged

An item is a dict holding its ground truth: "kind" (the question kind), "query" (what the question names), "truth"
(the right value), "objects" ([colour, shape, row, col] per object, image questions), and optionally "instruction"
({"id", ...}) and "history" (earlier [question, answer] turns). A preference row keeps the question kind in
"question_kind" ("kind" there names the rejected answer's failure).
"""
import collections
import json
import os
import re

from world import COLOURS, SHAPES, quadrant

# An answer is a refusal when each of its clauses says one of these ("I am not sure, but it is red." states red)
REFUSAL_MARKERS = ("cannot see", "can't see", "no image", "unable", "not able", "sorry", "don't know", "not sure",
                   "cannot answer", "can't answer", "cannot tell", "can't tell", "as an ai", "rather not")
NUM_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                        "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
COLOUR_RE = r"\b(" + "|".join(COLOURS) + r")\b"
SHAPE_RE = r"\b(" + "|".join(SHAPES) + r")s?\b"
NUM_RE = r"\b(\d+|" + "|".join(NUM_WORDS) + r")\b"
WORD_RE = re.compile(r"\w+")
DESCRIBE_RE = rf"{COLOUR_RE} {SHAPE_RE} (?:is )?(?:in|at) the (top|bottom) (left|right)\b"
IMAGE_QUESTIONS = ("colour", "count", "presence", "position", "describe")
QUESTION_KINDS = IMAGE_QUESTIONS + ("arith", "compare")   # arith and compare: the text questions
# A value right after a negation is not stated: "not red", "isn't blue", "not in the top left", "no blue circle"
NEGATED_RE = (r"(?:\b(?:not|no|never)|n't)\s+(?:(?:a|an|the|in the|at the)\s+)?(?:" + "|".join(COLOURS) + "|"
              + "|".join(NUM_WORDS) + r"|\d+|(?:top|bottom|upper|lower)[ -](?:left|right))\b")

# The failures the checker names. Perception slips: a wrong value a weak model states for a reason the checker can
# name (perception_slip says which, for an item); any other wrong value is "wrong_value"
ERROR_KINDS = ("overcount", "colour_confusion", "absent_object", "position_swap")
CONFUSED = {"green": "blue", "blue": "green"}   # the two cool hues a weak eye swaps
# An ignored instruction, by instruction id
IGNORED = {"one_word": "ignored_format", "number_only": "ignored_format", "key_value": "ignored_format",
           "min_words": "ignored_format", "one_per_line": "ignored_format", "max_words": "extra_clause",
           "only_colour": "ignored_scope", "only_half": "ignored_scope", "left_to_right": "ignored_scope"}
# Failure kind -> family; a wrong value is perception or text by its question (failure_family)
FAMILY = {"ignored_format": "instruction", "extra_clause": "instruction", "ignored_scope": "instruction",
          "refusal": "instruction", "repeated_answer": "instruction", **{k: "perception" for k in ERROR_KINDS}}


def _mentioned(a):
    """[colour, shape, quadrant] of each object a (lower-case) description names, in order."""
    return [[c, s, f"{v} {h}"] for c, s, v, h in re.findall(DESCRIBE_RE, a)]


def is_refusal(answer):
    """Every clause of the answer refuses (holds a REFUSAL_MARKER); an empty answer refuses too."""
    clauses = [c for c in re.split(r"[.,;:!?\n]|\bbut\b", (answer or "").lower().replace("\u2019", "'")) if c.strip()]
    return all(any(m in c for m in REFUSAL_MARKERS) for c in clauses)


def _question_kind(item):
    k = item.get("question_kind", item["kind"])   # a preference row keeps the question's kind there
    if k not in QUESTION_KINDS:
        raise ValueError(f"the checker does not know the question kind {k!r} (item {item.get('id', item)}); it "
                         f"judges {', '.join(QUESTION_KINDS)}")
    return k


def _numbers(text):
    return [int(m) if m.isdigit() else NUM_WORDS[m] for m in re.findall(NUM_RE, text)]


def is_correct(item, answer):
    """Judge a free-form answer: parse the key value; refusals, empty answers and answers naming two different
    values are wrong, and a negated value ("not red") is not stated. Raises on a question kind it does not know."""
    k, q, t = _question_kind(item), item["query"], item["truth"]
    raw = (answer or "").strip().lower().replace("\u2019", "'")
    if is_refusal(raw):
        return False
    a = re.sub(NEGATED_RE, " ", raw)
    if k == "presence" and (said := re.search(r"\b(yes|no)\b", raw)):
        # the first yes or no answers the question when what comes before it names no other object ("A blue
        # circle? Yes"); the objects named after it do not change it ("No, there is a blue circle.")
        before = re.sub(NEGATED_RE, " ", raw[:said.start()])
        return not (set(re.findall(SHAPE_RE, before)) - {q["shape"]} or set(re.findall(COLOUR_RE, before)) -
                    {q["colour"]}) and set(re.findall(r"\b(yes|no)\b", raw)) == {t}
    colours, shapes = set(re.findall(COLOUR_RE, a)), set(re.findall(SHAPE_RE, a))
    if k in ("colour", "count", "presence", "position"):
        if shapes - {q.get("shape")} or (k != "colour" and colours - {q.get("colour")}):
            return False                          # talks about some other object
    if k == "colour":
        return colours == {t}
    if k == "count":
        return set(_numbers(a)) == {t}
    if k == "presence":                           # no yes or no: "There isn't a blue circle.", "Not at all."
        no = bool(re.search(r"\b(not|none)\b|n't", raw))
        return (t == "no") == no and (no or bool(re.search(r"\bthere (is|are)\b", a)))
    if k == "position":
        vert = set(re.findall(r"\b(top|bottom|upper|lower)\b", a.replace("upper", "top").replace("lower", "bottom")))
        horiz = set(re.findall(r"\b(left|right)\b", a))
        return len(vert) == 1 and len(horiz) == 1 and f"{vert.pop()} {horiz.pop()}" == t
    if k == "describe":
        # every object named is in the image and every object asked for is named (a scope asks for some); each
        # colour word belongs to a named object, and a stated count is the number named
        found = _mentioned(a)
        said = collections.Counter(map(json.dumps, found))
        image = collections.Counter(json.dumps([c, s, quadrant(r, col)]) for c, s, r, col in item["objects"])
        return (bool(found) and not said - image and not collections.Counter(map(json.dumps, t)) - said
                and len(re.findall(COLOUR_RE, a)) == len(found) and set(_numbers(a)) <= {len(found)})
    if k == "arith":
        a = re.sub(rf"\b{q['a']}\s*\+\s*{q['b']}\b", " ", a)
        return set(_numbers(a)) == {t}
    a = re.sub(r"\bthan\s+\d+", " ", a)           # compare: "7 is larger than 4"
    return not re.search(r"\b(smaller|less|lower)\b", a) and set(_numbers(a)) == {t}


def follows(item, answer_text):
    """Strict instruction following (IFEval's strict mode: the raw answer, no clean-up) of the item's one
    instruction; None when it has none. An empty answer or a refusal follows nothing. Raises on an instruction id it
    does not know."""
    inst = item.get("instruction")
    if not inst:
        return None
    iid = inst["id"]
    if iid not in IGNORED:
        raise ValueError(f"the checker does not know the instruction {iid!r} (item {item.get('id', item)}); it "
                         f"checks {', '.join(IGNORED)}")
    a = (answer_text or "").strip()
    if is_refusal(a):
        return False
    words = WORD_RE.findall(a)
    if iid == "one_word":
        return len(words) == 1
    if iid == "number_only":
        return re.fullmatch(r"\d+\.?", a) is not None
    if iid == "key_value":
        return re.fullmatch(rf"{inst['key']}: [^\n]+", a, re.IGNORECASE) is not None
    if iid == "max_words":
        return len(words) <= inst["n"]
    if iid == "min_words":
        return len(words) >= inst["n"]
    if iid == "one_per_line":
        lines = [line for line in a.split("\n") if line.strip()]
        return len(lines) > 1 and all(len(re.findall(COLOUR_RE, line.lower())) == 1 for line in lines)
    found = _mentioned(a.lower())
    if iid == "only_colour":
        return bool(found) and set(re.findall(COLOUR_RE, a.lower())) == {inst["colour"]}
    if iid == "only_half":
        return bool(found) and all(p.startswith(inst["half"]) for _, _, p in found) and \
            len(re.findall(COLOUR_RE, a.lower())) == len(found)
    sides = [p.endswith("right") for _, _, p in found]   # left_to_right
    return len(found) > 1 and sides == sorted(sides)


def perception_slip(item):
    """(slip kind, wrong value): the named perception slip this item invites, or None. Counting one too many (of
    two or more), swapping the cool hues, saying "yes" to an absent object whose other-hue twin is there, and
    swapping left and right for a triangle; a function of the item alone, so a policy fitted on these slips makes
    them under greedy decoding (the weaker model, weaker.py, makes them)."""
    k, q, t = item["kind"], item["query"], item["truth"]
    if k == "count" and t >= 2:
        return "overcount", t + 1
    if k == "colour" and t in CONFUSED:
        return "colour_confusion", CONFUSED[t]
    if k == "presence" and t == "no" and [CONFUSED.get(q["colour"]), q["shape"]] in [o[:2] for o in item["objects"]]:
        # names an absent object whose twin of the other cool hue is there: only then, so that the SFT data still
        # teaches colour-shape binding on every other hard negative
        return "absent_object", "yes"
    if k == "position" and q["shape"] == "triangle":
        v, h = t.split()
        return "position_swap", v + " " + ("right" if h == "left" else "left")
    return None


def failure_kind(item, answer_text):
    """What is wrong with an answer: None when it is right (correct and following its instruction), else refusal,
    repeated_answer (a follow-up answered with the earlier turn's answer), the item's ignored-instruction kind (not
    for a scoped description that names the scope's places with a wrong attribute), the item's perception slip when
    the answer states it, or wrong_value."""
    item = dict(item, kind=_question_kind(item))
    a = (answer_text or "").strip().lower()
    if is_refusal(a):
        return "refusal"
    followed, correct = follows(item, answer_text) is not False, is_correct(item, answer_text)
    if followed and correct:
        return None
    if item.get("history") and WORD_RE.findall(a) == WORD_RE.findall(item["history"][-1][1].lower()):
        return "repeated_answer"
    # A colour scope answered with exactly the scope's places but a wrong colour ("only the blue objects" -> "a green
    # circle in the top left", where the blue circle is) fails `follows` strictly, yet what is wrong is perception
    kept = (item.get("instruction") or {}).get("id") in ("only_colour", "only_half") and \
        sorted(p for _, _, p in _mentioned(a)) == sorted(o[2] for o in item["truth"])
    if not followed and not kept:
        return IGNORED[item["instruction"]["id"]]
    slip = perception_slip(item)
    return slip[0] if slip and is_correct(dict(item, truth=slip[1]), answer_text) else "wrong_value"


def failure_family(kind, question_kind=None):
    """instruction (form, scope, refusal), perception (a wrong value about the image) or text (arithmetic)."""
    if kind in FAMILY:
        return FAMILY[kind]
    return "perception" if question_kind in IMAGE_QUESTIONS else "text"


def pair_family(row):
    """The family a preference pair is reported under: its failure's, except that a content failure on a follow-up
    is "followup": the earlier turn may state the value ("The square is blue." before "Now answer in one word."),
    so the text alone can tell, and the pair must not pass for one that needs the image."""
    family = failure_family(row["kind"], row.get("question_kind"))
    return "followup" if row.get("history") and family != "instruction" else family


def content_family(item):
    """Where an item's content accuracy is reported: followup (a second turn: the earlier turn may state its value,
    and a new question answered by repeating the earlier answer is wrong in content, which would pass for a
    perception or arithmetic error), else perception (an image question) or text."""
    return "followup" if item.get("history") else "perception" if item.get("objects") else "text"


def judge(items, answers):
    """The checker over answers to `items`: content accuracy (is_correct) overall, per question kind and per
    content_family (perception: the first-turn image questions; text; followup), strict instruction following
    (follows) over the items that carry an instruction, overall and per instruction, the share of follow-ups (second
    turns) answered right, and the share of items with each failure kind (failure_kind, which names an instruction
    failure before a content one) and family (pair_family's, so that a follow-up's wrong value is not counted as
    perception here while its pairs and its content accuracy report it apart). `right` is the share of items whose
    failure_kind is None: right in content and following the instruction, "right on both"."""
    by_kind, by_family, by_inst, fails, families = {}, {}, {}, collections.Counter(), collections.Counter()
    followups = []
    for it, ans in zip(items, answers):
        ok = is_correct(it, ans)
        by_kind.setdefault(it["kind"], []).append(ok)
        by_family.setdefault(content_family(it), []).append(ok)
        if it.get("instruction"):
            by_inst.setdefault(it["instruction"]["id"], []).append(bool(follows(it, ans)))
        f = failure_kind(it, ans)
        if it.get("history"):
            followups.append(f is None)
        if f is not None:
            fails[f] += 1
            families[pair_family({"kind": f, "question_kind": it["kind"], "history": it.get("history")})] += 1
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    followed = sum(by_inst.values(), [])
    return {"accuracy": mean(sum(by_kind.values(), [])),
            "accuracy_by_kind": {k: mean(v) for k, v in sorted(by_kind.items())},
            "accuracy_by_family": {k: mean(v) for k, v in sorted(by_family.items())},
            "instruction_following": mean(followed) if followed else None,
            "instruction_following_by_id": {k: mean(v) for k, v in sorted(by_inst.items())},
            "right": 1 - sum(fails.values()) / max(len(items), 1),
            "followup_right": mean(followups) if followups else None,
            "failures_by_kind": {k: n / len(items) for k, n in sorted(fails.items())},
            "failures_by_family": {k: n / len(items) for k, n in sorted(families.items())}}


def tagged(result, tag):
    """judge()'s keys with `tag` after the metric's name: accuracy_by_kind -> accuracy_<tag>_by_kind."""
    return {k.replace("_by_", f"_{tag}_by_") if "_by_" in k else f"{k}_{tag}": v for k, v in result.items()}


def prompt(item, image_dir):
    """(question, images, history): what model.answer takes for this item."""
    return (item["question"], [os.path.join(image_dir, item["image"])] if "image" in item else [],
            item.get("history", ()))


def eval_policy(model, items, hd_num=9, batch=64, max_new_tokens=48):
    """A policy's greedy answers to world held-out items (store.heldout_items: each knows its image folder), judged."""
    model.eval()
    answers = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        answers += model.answer([prompt(it, it["_dir"]) for it in chunk], hd_num, max_new_tokens)
    return judge(items, answers)
