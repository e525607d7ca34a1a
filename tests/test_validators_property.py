"""Property tests (hypothesis) for the record validators, DataError and SkipCounter."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capstone_lib.validation import (IMAGE_TOKEN, DataError, SkipCounter, validate_caption,
                                     validate_caption_annotation, validate_conversation,
                                     validate_llava_record)

common = settings(max_examples=60, deadline=None)   # per test: no global hypothesis profile change

# text with at least one visible character and no <image> token
words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip() and IMAGE_TOKEN not in s and "<" not in s)
blank = st.text(alphabet=" \t\n\r", max_size=5)


@st.composite
def conversations(draw):
    """A valid LLaVA conversation: 1-4 exchanges, <image> once in the first human turn."""
    n = draw(st.integers(1, 4))
    turns = []
    for i in range(n):
        turns.append({"from": "human", "value": draw(words)})
        turns.append({"from": "gpt", "value": draw(words)})
    first = turns[0]["value"]
    turns[0]["value"] = (f"{first}\n{IMAGE_TOKEN}" if draw(st.booleans()) else f"{IMAGE_TOKEN}\n{first}")
    return turns


def raises_naming(fn, *args, path="data/file.json", record=7, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, path=path, record=record, **kwargs)
    assert str(info.value).startswith(f"{path}: record {record}")
    return info.value


@common
@given(conversations())
def test_valid_conversations_pass_unchanged(turns):
    assert validate_conversation(copy.deepcopy(turns)) == turns


@common
@given(conversations(), st.data())
def test_out_of_order_turns_fail(turns, data):
    i = data.draw(st.integers(0, len(turns) - 1))
    bad = copy.deepcopy(turns)
    bad[i]["from"] = data.draw(st.sampled_from(["gpt", "human", "user", "assistant", ""]).filter(
        lambda s: s != turns[i]["from"]))
    err = raises_naming(validate_conversation, bad)
    assert f"turn {i}" in err.message


@common
@given(conversations(), st.data())
def test_dropping_a_turn_fails(turns, data):
    i = data.draw(st.integers(0, len(turns) - 1))
    bad = turns[:i] + turns[i + 1:]
    if not bad:
        raises_naming(validate_conversation, bad)
    else:
        assert "odd number of turns" in raises_naming(validate_conversation, bad).message


@common
@given(conversations(), st.data())
def test_image_token_only_once_and_only_first(turns, data):
    bad = copy.deepcopy(turns)
    bad[0]["value"] = bad[0]["value"].replace(IMAGE_TOKEN, "").strip() or "x"
    assert "found 0" in raises_naming(validate_conversation, bad).message
    bad = copy.deepcopy(turns)
    bad[0]["value"] += IMAGE_TOKEN
    assert "found 2" in raises_naming(validate_conversation, bad).message
    if len(turns) > 1:
        i = data.draw(st.integers(1, len(turns) - 1))
        bad = copy.deepcopy(turns)
        bad[i]["value"] = IMAGE_TOKEN + bad[i]["value"]
        assert f"turn {i}: {IMAGE_TOKEN} may only appear" in raises_naming(validate_conversation, bad).message


@common
@given(conversations(), st.data(), blank)
def test_empty_values_fail(turns, data, space):
    i = data.draw(st.integers(0, len(turns) - 1))
    bad = copy.deepcopy(turns)
    bad[i]["value"] = (IMAGE_TOKEN + space) if i == 0 else space
    assert f"turn {i}: empty text" in raises_naming(validate_conversation, bad).message


@common
@given(conversations(), st.data(), st.one_of(st.none(), st.integers(), st.lists(st.text(), max_size=2)))
def test_wrong_value_types_fail(turns, data, value):
    i = data.draw(st.integers(0, len(turns) - 1))
    bad = copy.deepcopy(turns)
    bad[i]["value"] = value
    assert f"turn {i}" in raises_naming(validate_conversation, bad).message


@common
@given(st.text(max_size=40))
def test_caption_validator(text):
    if text.strip():
        assert validate_caption(text) == text.strip()
        assert validate_caption_annotation({"image_id": 3, "caption": text}) == (3, text.strip())
    else:
        assert raises_naming(validate_caption, text).message == "empty caption"


@common
@given(st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text())))
def test_caption_validator_rejects_non_strings(value):
    assert "must be a string" in raises_naming(validate_caption, value).message


@common
@given(st.one_of(st.text(max_size=5), st.floats(), st.booleans(), st.none()), words)
def test_caption_annotation_needs_integer_image_id(image_id, caption):
    with pytest.raises(DataError, match="image_id"):
        validate_caption_annotation({"image_id": image_id, "caption": caption}, "f.json", 0)


@common
@given(st.one_of(st.text(min_size=1, max_size=12), st.integers(0, 10**12)), conversations(), words)
def test_llava_record_validator(rid, turns, image):
    rid_out, image_out, turns_out = validate_llava_record(
        {"id": rid, "image": image, "conversations": turns}, "x.json", 3)
    assert (rid_out, image_out, turns_out) == (str(rid), image, turns)
    with pytest.raises(DataError, match="text-only record") as info:
        validate_llava_record({"id": rid, "conversations": turns}, "x.json", 3)
    assert str(info.value).startswith(f"x.json: record 3 (id {rid!r})")


@common
@given(st.text(max_size=30), st.text(min_size=1, max_size=20), st.one_of(st.integers(), st.text(max_size=8)))
def test_data_error_always_names_file_and_record(message, path, record):
    err = DataError(message, path=path, record=record)
    assert isinstance(err, ValueError)
    assert str(err) == f"{path}: record {record}: {message}"
    assert (err.message, err.path, err.record) == (message, path, record)


@common
@given(st.lists(st.sampled_from(["missing image", "text-only record", "empty caption"]), max_size=30),
       st.integers(0, 40))
def test_skip_counter_counts_and_limits(reasons, limit):
    skips = SkipCounter(limit=limit)
    for k, reason in enumerate(reasons):
        if k + 1 > limit:
            with pytest.raises(DataError, match=f"more than {limit} records skipped"):
                skips.skip(reason, "f.json", k)
            break
        skips.skip(reason, "f.json", k)
    assert skips.count == sum(skips.by_reason.values()) == min(len(reasons), limit + 1)
    report = skips.report()
    for reason, n in skips.by_reason.items():
        assert f"{n} x {reason}" in report
