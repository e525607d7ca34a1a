"""ShapesWorld evaluation: answer normalisation, caption matching and grounding, per-type accuracy."""
from __future__ import annotations

from capstone_lib.evaluate import (answers_match, caption_accuracy, caption_matches, normalize_answer,
                                   vqa_accuracy, yes_no_verdict)

RED_CIRCLE = {"color": "red", "shape": "circle", "position": "top left"}
BLUE_SQUARE = {"color": "blue", "shape": "square", "position": "center"}
GREEN_TRIANGLE = {"color": "green", "shape": "triangle", "position": "bottom"}


def test_normalisation_case_punctuation_articles_numbers():
    assert normalize_answer("  The Top-Left!  ") == "top left"
    assert normalize_answer("Two.") == "two" and normalize_answer("2") == "two"
    assert answers_match("A red circle", "red circle") and answers_match("Yes.", "yes")
    assert not answers_match("yes", "no") and not answers_match("three", "2")


def test_yes_no_answers_may_state_their_evidence_first():
    assert yes_no_verdict("The square is blue, so no.") == "no"
    assert answers_match("The squares are red and blue, so yes.", "yes")
    assert answers_match("There is no circle, so no.", "no") and answers_match("No.", "no")
    assert not answers_match("The square is blue, so no.", "yes")
    assert not answers_match("No, so the square is blue.", "no")          # the verdict must come last
    assert not answers_match("yes no", "no") and not answers_match("so", "no")
    assert not answers_match("blue, so blue", "blue") and answers_match("Blue.", "blue")  # only yes/no


def test_caption_matches_needs_every_object_and_right_positions():
    scene = [RED_CIRCLE, BLUE_SQUARE]
    assert caption_matches("A red circle at the top left and a blue square in the center.", scene)
    assert caption_matches("A blue square and a red circle.", scene)               # positions optional
    assert not caption_matches("A red circle at the top left.", scene)              # one missing
    assert not caption_matches("A red circle at the bottom and a blue square.", scene)   # wrong place
    assert not caption_matches("A red circle, a blue square and a green triangle.", scene)


def test_caption_grounding_against_own_and_other_scene():
    scenes = [{"image_id": 1, "objects": [RED_CIRCLE]}, {"image_id": 2, "objects": [BLUE_SQUARE]},
              {"image_id": 3, "objects": [GREEN_TRIANGLE, RED_CIRCLE]}]
    said = {1: "A red circle.", 2: "A green circle.", 3: "A green triangle and a red circle."}
    out = caption_accuracy(said.get, scenes)
    assert out["caption_accuracy"] == 2 / 3 and out["n_captions"] == 3
    assert abs(out["caption_precision"] - (1 + 0 + 1) / 3) < 1e-9
    assert abs(out["caption_recall"] - (1 + 0 + 1) / 3) < 1e-9
    # against the next scene: "red circle" vs blue square 0, "green circle" vs scene 3: 0,
    # "green triangle, red circle" vs red circle: 1/2
    assert abs(out["caption_precision_other_scene"] - 0.5 / 3) < 1e-9
    blind = caption_accuracy(lambda i: "A red circle.", scenes)   # ignores its image
    assert blind["caption_precision"] == blind["caption_precision_other_scene"]


def test_vqa_accuracy_per_type():
    qs = [{"question": "q1", "answer": "red", "type": "color"}, {"question": "q2", "answer": "two", "type": "count"},
          {"question": "q3", "answer": "yes", "type": "exists"}, {"question": "q4", "answer": "blue", "type": "color"}]
    preds = {"q1": "Red.", "q2": "2", "q3": "no", "q4": "green"}
    out = vqa_accuracy(lambda q: preds[q["question"]], qs)
    assert out["n_questions"] == 4 and out["vqa_accuracy"] == 0.5
    assert out["vqa_by_type"] == {"color": 0.5, "count": 1.0, "exists": 0.0}
