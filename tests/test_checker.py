"""The world's checker on hand-written answers: is_correct, follows, failure_kind and judge say what a reader
expects, and checker.py stands alone (it does not call the weaker model that makes the failures it names)."""
import ast

import numpy as np
import pytest

from conftest import ROOT
from world import checker, quadrant, scene, weaker


def item(kind, truth, query, objects=None):
    it = {"kind": kind, "truth": truth, "query": query}
    return dict(it, objects=objects) if objects is not None else it


OBJS = [["green", "circle", 0, 0], ["red", "triangle", 0, 3], ["red", "square", 3, 0], ["red", "square", 3, 3]]


CASES = [  # (item, answers judged right, answers judged wrong)
    (item("colour", "green", {"shape": "circle"}, OBJS),
     ["The circle is green.", "green", "It's Green.", "The circle is not blue, it is green."],
     ["The circle is blue.", "The circle is green or blue.", "The square is green.", "The circle is not green.",
      "It isn't green."]),
    (item("count", 3, {"colour": "red"}, OBJS),
     ["There are 3 red objects.", "three", "3"],
     ["There are 4 red objects.", "There are 3 or 4.", "There are 3 blue objects.", "many", "Not 3."]),
    (item("presence", "no", {"colour": "blue", "shape": "circle"}, OBJS),
     ["No, there is no blue circle.", "No.", "There isn't a blue circle.", "No, there is a green circle.",
      "No, there is no red circle."],   # the yes or no answers the question, whatever the answer names after it
     ["Yes, there is a blue circle.", "There is a blue circle.", "Yes. No.", "There is a green circle."]),
    (item("presence", "yes", {"colour": "green", "shape": "circle"}, OBJS),
     ["Yes, there is a green circle.", "yes", "There is a green circle."], ["No.", "Not at all."]),
    (item("position", "top right", {"colour": "red", "shape": "triangle"}, OBJS),
     ["The red triangle is in the top right.", "Upper right.", "top-right corner"],
     ["The red triangle is in the top left.", "top right or bottom right", "The red square is in the top right.",
      "The red triangle is not in the top right."]),
    (item("describe", [["green", "circle", "top left"], ["red", "triangle", "top right"],
                       ["red", "square", "bottom left"], ["red", "square", "bottom right"]], {}, OBJS),
     [scene.render(item("describe", None, {}), [["green", "circle", "top left"], ["red", "triangle", "top right"],
                                               ["red", "square", "bottom left"], ["red", "square", "bottom right"]])],
     ["There are 3 objects: a green circle in the top left, a red triangle in the top right and "
      "a red square in the bottom left.", "There are 4 objects: a green circle in the top left, a red triangle "
      "in the top right, a red square in the bottom left and a blue square in the bottom right."]),
    (item("arith", 11, {"a": 4, "b": 7}), ["4 + 7 = 11.", "11", "The answer is eleven.", "4+7=11"],
     ["4 + 7 = 12.", "4 + 7 = 1.", "11 or 12"]),
    (item("compare", 13, {"a": 12, "b": 13}), ["13 is larger.", "13 is larger than 12.", "13"],
     ["12 is larger.", "12", "13 is smaller.", "12 or 13"]),
]


@pytest.mark.parametrize("it,good,bad", CASES, ids=[c[0]["kind"] for c in CASES])
def test_is_correct(it, good, bad):
    assert checker.is_correct(it, scene.render(it, it["truth"]))
    for a in good:
        assert checker.is_correct(it, a), a
    for a in bad + ["", "   "] + sum(weaker.REFUSALS.values(), []):
        assert not checker.is_correct(it, a), a


INSTRUCTED = [  # (question kind, truth, query, instruction, answers that follow it, answers that do not)
    ("colour", "green", {"shape": "circle"}, {"id": "one_word"}, ["Green.", "green"],
     ["The circle is green.", "Green circle."]),
    ("count", 3, {"colour": "red"}, {"id": "number_only"}, ["3", "3."], ["three", "There are 3.", "3 objects"]),
    ("count", 3, {"colour": "red"}, {"id": "key_value", "key": "count"}, ["count: 3", "Count: 3"],
     ["3", "The count is 3.", "count 3", "count: 3\ncount: 3"]),
    ("presence", "no", {"colour": "blue", "shape": "circle"}, {"id": "max_words", "n": 5},
     ["No.", "No, there is none."], ["A blue circle? No, there is none. I checked the whole image carefully."]),
    ("position", "top right", {"colour": "red", "shape": "triangle"}, {"id": "min_words", "n": 10},
     ["The red triangle: top right. I checked the whole image carefully."], ["The red triangle: top right."]),
    ("describe", None, {}, {"id": "one_per_line"},
     ["A green circle in the top left.\nA red triangle in the top right.\nA red square in the bottom left.\n"
      "A red square in the bottom right."],
     ["There are 4 objects: a green circle in the top left, a red triangle in the top right, a red square in the "
      "bottom left and a red square in the bottom right.", "A green circle in the top left and a red triangle in "
      "the top right.\nA red square in the bottom left.\nA red square in the bottom right."]),
    ("describe", None, {}, {"id": "only_colour", "colour": "red"},
     ["There are 3 objects: a red triangle in the top right, a red square in the bottom left and a red square in "
      "the bottom right."],
     ["There are 4 objects: a green circle in the top left, a red triangle in the top right, a red square in the "
      "bottom left and a red square in the bottom right."]),
    ("describe", None, {}, {"id": "only_half", "half": "top"},
     ["There are 2 objects: a green circle in the top left and a red triangle in the top right."],
     ["There are 3 objects: a green circle in the top left, a red triangle in the top right and a red square in "
      "the bottom left."]),
    ("describe", None, {}, {"id": "left_to_right"},
     ["There are 4 objects: a green circle in the top left, a red square in the bottom left, a red triangle in "
      "the top right and a red square in the bottom right."],
     ["There are 4 objects: a green circle in the top left, a red triangle in the top right, a red square in the "
      "bottom left and a red square in the bottom right."]),
]


@pytest.mark.parametrize("kind,truth,query,inst,good,bad", INSTRUCTED, ids=[c[3]["id"] for c in INSTRUCTED])
def test_follows_is_strict_and_apart_from_content(kind, truth, query, inst, good, bad):
    """Each instruction's checker on hand-written answers; ignoring an instruction is an instruction failure, not a
    content one, and a refusal follows nothing. The world's own renderings follow (answer) and do not (ignored)."""
    objs = [[c, s, quadrant(r, col)] for c, s, r, col in OBJS]
    it = item(kind, truth, query, OBJS)
    if kind == "describe":
        it["truth"] = scene._scoped(inst, objs)
    it["instruction"] = inst
    for a in good:
        assert checker.follows(it, a) is True, a
    for a in bad + ["", weaker.REFUSALS["image"][0]]:
        assert checker.follows(it, a) is False, a
    assert checker.failure_kind(it, scene.answer(it, it["truth"])) is None
    assert checker.failure_kind(it, scene.ignored(it, it["truth"])) == checker.IGNORED[inst["id"]]
    assert checker.is_correct(it, scene.ignored(it, it["truth"]))   # the content is right; the form is not
    assert checker.failure_kind(it, weaker.REFUSALS["image"][2]) == "refusal"
    assert checker.follows(dict(it, instruction=None), good[0]) is None


def test_a_scoped_description_with_a_wrong_colour_is_a_perception_failure():
    """"Only the blue objects" answered with the blue object's place but another colour breaks the instruction's
    strict check, yet names the scope: the failure is perception. Naming other places is ignoring the scope."""
    objs = [["blue", "circle", 0, 0], ["red", "square", 3, 3]]
    it = dict(item("describe", [["blue", "circle", "top left"]], {}, objs), instruction={"id": "only_colour",
              "colour": "blue"})
    swapped = "There is 1 object: a green circle in the top left."
    assert checker.follows(it, swapped) is False and checker.failure_kind(it, swapped) == "wrong_value"
    assert checker.failure_family(checker.failure_kind(it, swapped), "describe") == "perception"
    assert checker.failure_kind(it, "There is 1 object: a red square in the bottom right.") == "ignored_scope"
    assert checker.failure_kind(it, "There are 2 objects: a blue circle in the top left and a red square in the "
                                  "bottom right.") == "ignored_scope"
    assert checker.failure_kind(it, "There is 1 object: a blue circle in the top left.") is None


def test_refusals_are_whole_answers():
    """An answer refuses when each of its clauses does; a hedge before a stated value is an answer, judged on it."""
    it = item("colour", "green", {"shape": "circle"}, OBJS)
    for a in sum(weaker.REFUSALS.values(), []) + ["", "Sorry.", "I cannot tell, sorry."]:
        assert checker.is_refusal(a) and checker.failure_kind(it, a) == "refusal", a
    assert checker.is_correct(it, "I am not sure, but it is green.")
    assert checker.failure_kind(it, "I am not sure, but it is green.") is None
    assert checker.failure_kind(it, "Sorry, it is blue.") == "colour_confusion"
    inst = dict(it, instruction={"id": "max_words", "n": 5})
    assert checker.follows(inst, "Not sure, but green.") and not checker.follows(inst, "I am not sure.")


def test_the_checker_refuses_what_it_does_not_know():
    """An unknown question kind or instruction id is an error naming it, not judged as some other kind."""
    with pytest.raises(ValueError, match="question kind 'count_all'"):
        checker.is_correct(item("count_all", 3, {}), "3")
    with pytest.raises(ValueError, match="question kind 'count_all'"):
        checker.failure_kind(item("count_all", 3, {}), "3")
    with pytest.raises(ValueError, match="instruction 'uppercase'"):
        checker.follows(dict(item("colour", "green", {"shape": "circle"}, OBJS), instruction={"id": "uppercase"}),
                        "GREEN")
    assert checker.is_correct({"kind": "refusal", "question_kind": "arith", "truth": 11, "query": {"a": 4, "b": 7}},
                              "11")   # a preference row: "kind" names the rejected answer's failure


def test_failure_kind_names_the_perception_slip():
    it = item("colour", "green", {"shape": "circle"}, OBJS)
    assert checker.failure_kind(it, "The circle is blue.") == "colour_confusion"
    assert checker.failure_kind(it, "The circle is red.") == "wrong_value"
    assert checker.failure_kind(it, "The circle is green.") is None
    assert checker.failure_family("colour_confusion") == "perception" and checker.failure_family("extra_clause") == \
        "instruction" and checker.failure_family("wrong_value", "arith") == "text"


def test_follow_ups():
    """A second turn is judged on its own question: repeating the earlier answer (up to punctuation and case) is
    repeated_answer, an instruction failure; a follow-up the earlier answer already answers is never made; the
    prompt and the conversation carry the earlier turn."""
    colour = item("colour", "green", {"shape": "circle"}, OBJS)
    first = "The circle is green."
    reform = dict(colour, instruction={"id": "one_word"}, question="Now answer in one word.", history=[["What colour "
                  "is the circle?", first]])
    assert checker.failure_kind(reform, first) == "repeated_answer" and checker.failure_family("repeated_answer") == \
        "instruction"
    assert checker.failure_kind(reform, "Green.") is None
    assert checker.failure_kind(reform, "Blue.") == "colour_confusion"
    assert checker.failure_kind(reform, "The circle is blue.") == "ignored_format"   # not a repeat: another answer
    new = dict(item("count", 3, {"colour": "red"}, OBJS), question="How many red objects are there?",
               history=[["What colour is the circle?", first]])
    assert checker.failure_kind(new, first) == checker.failure_kind(new, "the circle is green") == "repeated_answer"
    assert checker.failure_kind(new, "The number of red objects is 3.") is None
    r = checker.judge([reform, new, colour], [first, "The number of red objects is 3.", first])
    assert r["followup_right"] == 0.5 and r["failures_by_kind"] == {"repeated_answer": 1 / 3}
    assert checker.prompt(new, "d")[2] == new["history"] and scene.turns(new, "x")[:2] == [
        {"from": "user", "value": "What colour is the circle?"}, {"from": "assistant", "value": first}]
    rng = np.random.default_rng(0)
    made = [it for it in (scene.make_item(rng, instruction_share=0.5, followup_share=1.0) for _ in range(400))
            if "history" in it]
    assert len(made) > 300 and {"instruction" in it for it in made} == {True, False}
    assert all(checker.failure_kind(it, it["history"][0][1]) == "repeated_answer" for it in made)
    assert all(it["question"].startswith("Now ") for it in made if "instruction" in it)


def test_judge_reports_both_families():
    items = [dict(item("count", 3, {"colour": "red"}, OBJS), instruction={"id": "number_only"}),
             item("colour", "green", {"shape": "circle"}, OBJS), item("colour", "green", {"shape": "circle"}, OBJS),
             item("arith", 11, {"a": 4, "b": 7})]
    r = checker.judge(items, ["There are 3 red objects.", "The circle is blue.", "The circle is red.", "4 + 7 = 12."])
    assert r["accuracy"] == 0.25 and r["instruction_following"] == 0.0 and r["right"] == 0.0
    assert r["accuracy_by_family"] == {"perception": 1 / 3, "text": 0.0}
    assert r["failures_by_kind"] == {"ignored_format": 0.25, "colour_confusion": 0.25, "wrong_value": 0.5}
    assert r["failures_by_family"] == {"instruction": 0.25, "perception": 0.5, "text": 0.25}
    assert checker.tagged(r, "before")["accuracy_before_by_kind"] == r["accuracy_by_kind"]
    # a second turn's content is reported apart from the first-turn image and text questions
    again = dict(item("colour", "green", {"shape": "circle"}, OBJS), history=[["Is there a red square?", "No."]])
    r = checker.judge(items + [again], ["There are 3 red objects.", "The circle is blue.", "The circle is red.",
                                      "4 + 7 = 12.", "The circle is green."])
    assert r["accuracy_by_family"] == {"followup": 1.0, "perception": 1 / 3, "text": 0.0}
    wrong_again = checker.judge([again], ["The circle is blue."])
    assert wrong_again["failures_by_kind"] == {"colour_confusion": 1.0}
    assert wrong_again["failures_by_family"] == {"followup": 1.0}


def test_every_error_kind_is_wrong():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        it = scene.make_item(rng)
        err = checker.perception_slip(it)
        if err:
            seen.add(err[0])
            assert not checker.is_correct(it, scene.render(it, err[1])), (it, err)
    assert seen == set(checker.ERROR_KINDS)


def test_the_checker_reads_only_the_worlds_vocabulary():
    """checker.py imports nothing from the world's generation, the weaker model or the files: what it judges is in
    the item and in its own file; its image kinds are the scenes'."""
    tree = ast.parse((ROOT / "world" / "checker.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"collections", "json", "os", "re", "world"}, imported
    assert set(checker.IMAGE_QUESTIONS) == set(scene.IMAGE_KINDS)
