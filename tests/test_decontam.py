"""Decontamination by word n-grams, on texts written by hand: word order counts, a text of
exactly ``n`` words is one n-gram, every text and every set is checked (not just the first),
which items own an n-gram, records' nested strings, eval files and globs, deny patterns.
No model, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solar_ray.data.decontam import (
    EvalIndex,
    build_eval_index,
    deny_match,
    iter_strings,
    ngram_hashes,
    words,
)
from solar_ray.errors import UserError

ABCD = "alpha beta gamma delta"


def test_words_and_ngrams():
    assert words("The CAT's hat, 2 times!") == ["the", "cat", "s", "hat", "2", "times"]
    assert len(ngram_hashes(ABCD, 4)) == 1  # exactly n words: one n-gram
    assert len(ngram_hashes(ABCD, 5)) == 0
    assert len(ngram_hashes(ABCD, 2)) == 3
    # repeated n-grams count once; the hashes are sorted (searched by bisection)
    h = ngram_hashes("a b a b a b c", 2)
    assert len(h) == 3 and list(h) == sorted(h)
    assert ngram_hashes("Alpha, BETA gamma", 3).tolist() == ngram_hashes("alpha beta gamma", 3).tolist()


@pytest.mark.parametrize(
    "other",
    [
        "delta beta gamma alpha",  # first and last words swapped
        "beta alpha gamma delta",  # first two swapped
        "alpha beta delta gamma",  # last two swapped
        "gamma beta alpha delta",  # first and third swapped
        "alpha delta gamma beta",  # second and fourth swapped
        "delta gamma beta alpha",  # reversed
    ],
)
def test_word_order_makes_the_ngram(other):
    index = EvalIndex.build({"e": [("0", ABCD)]}, 4)
    assert index.match([other]) is None
    assert index.match([f"x {ABCD} y"]) == "e"


def test_every_text_and_every_set_is_checked():
    index = EvalIndex.build({"empty": [("s", "too short")], "first": [("1", "one two three")],
                             "second": [("2", ABCD)]}, 3)  # fmt: skip
    assert index.num_texts == {"empty": 0, "first": 1, "second": 1}
    # a short text before the copy; a set with no n-gram before the one that matches
    assert index.match(["hi", "and gamma delta", f"so {ABCD}"]) == "second"
    assert index.match(["zzz one two three"]) == "first"
    assert index.match(["omega " * 5]) is None  # a hash past every indexed one
    assert index.match([]) is None
    assert EvalIndex.build({}, 3).match([ABCD]) is None
    assert EvalIndex.build({"e": []}, 3).match([ABCD]) is None


def test_find_names_every_owner_and_the_words():
    sets = {"e": [("a", "one two three four"), ("b", "zero one two three"), ("c", "x y")],
            "f": [("d", "two three four five")]}  # fmt: skip
    index = EvalIndex.build(sets, 3, owners=True)
    hits = list(index.find("One two three FOUR five"))
    assert hits == [
        ("e", "a", "one two three"), ("e", "b", "one two three"), ("e", "a", "two three four"),
        ("f", "d", "two three four"), ("f", "d", "three four five"),
    ]  # fmt: skip
    assert list(index.find("one two")) == [] and list(index.find("nine ten eleven")) == []


def test_iter_strings_of_nested_records():
    rec = {"q": "a", "n": 3, "choices": ["b", ("c", None)], "meta": {"x": {"y": "d"}}, "f": 1.5}
    assert list(iter_strings(rec)) == ["a", "b", "c", "d"]
    assert list(iter_strings("e")) == ["e"] and list(iter_strings(7)) == []


def test_eval_files_globs_and_their_field_names(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"q": "one two three", "a": ["four five six"]}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "seven eight nine"}) + "\n")
    index = build_eval_index([str(tmp_path / "*.jsonl")], 3)
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert sorted(index.sets) == [a, b] and index.num_texts == {a: 2, b: 1}
    assert index.match(["x four five six"]) == a
    assert index.match(["three four five"]) is None  # two fields are two texts
    assert index.match(["Seven, eight; nine."]) == b
    with pytest.raises(UserError, match=r"^mix\.eval_sets\.1: "):
        build_eval_index([a, str(tmp_path / "missing.jsonl")], 3, field="mix.eval_sets")
    with pytest.raises(UserError, match=r"^eval_sets\.0: no offline benchmark 'nope'"):
        build_eval_index(["offline:nope"], 3)


def test_deny_patterns():
    assert deny_match("flan.1234", ["cot", "flan"]) == "flan"  # a bare word: the prefix
    assert deny_match("flan", ["flan"]) == "flan"
    assert deny_match("niv.3", ["flan", "niv.*"]) == "niv.*"
    assert deny_match("niv.3", ["niv.3"]) == "niv.3"
    assert deny_match("niv.3.x", ["niv"]) == "niv"
    assert deny_match("flanx.1", ["flan"]) is None and deny_match("Flan.1", ["flan"]) is None
    assert deny_match("cot.3", ["flan"]) is None
    assert deny_match("", ["*"]) is None and deny_match(None, ["*"]) is None
    assert deny_match("flan.1", []) is None


def test_offline_names_the_offline_suite_and_each_of_its_tasks(monkeypatch):
    from solar_ray.evalsets import benchmarks

    monkeypatch.setattr(benchmarks, "item_texts", lambda name: [(f"{name}/0", f"{name} one two")])
    suite = sorted(f"offline:{n}" for n, b in benchmarks.BENCHMARKS.items() if b.h6)
    assert len(suite) >= 2 and sorted(build_eval_index(["offline"], 3).sets) == suite
    index = build_eval_index(["offline:arc_easy"], 3)
    assert index.match(["so arc_easy one two"]) == "offline:arc_easy"


def test_owners_in_text_order_and_sets_without_any_ngram():
    # one n-gram in many texts: find() names its owners in the set's order (a stable sort;
    # numpy's default sort reorders equal keys once there are more than 16 of them)
    texts = [(f"t{i}", f"shared words here w{i} x{i}") for i in range(60)]
    index = EvalIndex.build({"s": texts, "short": [("a", "two words")]}, 3, owners=True)
    owners = [tid for name, tid, gram in index.find("the shared words here") if gram == "shared words here"]
    assert owners == [f"t{i}" for i in range(60)]
    # a set whose texts are all shorter than n has no n-gram and finds nothing
    assert len(index.sets["short"]) == 0 and index.num_texts["short"] == 0
    assert [hit for hit in index.find("two words two words") if hit[0] == "short"] == []
