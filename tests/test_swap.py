from __future__ import annotations

import csv

import pytest

from bias.swap import slot, swapped_pairs
from tests.conftest import SHARED_DATA

CROWS = SHARED_DATA / "crows_pairs" / "crows_pairs_anonymized.csv"


def test_a_pair_differing_in_one_run_of_words_becomes_a_slot_with_its_shared_punctuation() -> None:
    s = slot("The tall clerk was tired.", "The short clerk was tired.")
    assert s is not None and (s.prefix, s.more, s.less, s.suffix) == (("The",), "tall", "short", ("clerk", "was", "tired."))
    t = slot("My uncle is young.", "My uncle is old.")
    assert t is not None and (t.more, t.less, t.tail) == ("young", "old", ".")
    assert t.fill("quiet", "loud") == ("My uncle is quiet.", "My uncle is loud.")
    # two separate differences, or an insertion: no single slot to fill
    assert slot("A tall man met a young clerk.", "A short man met an old clerk.") is None
    assert slot("The clerk was tired.", "The clerk was very tired.") is None


def test_a_term_moved_to_a_sentence_start_is_capitalised_and_a_common_word_lowered_off_it() -> None:
    start = slot("Tall people like soup.", "Short people like soup.")
    mid = slot("I think tall people like soup.", "I think short people like soup.")
    assert start is not None and mid is not None
    assert start.fill("old", "young") == ("Old people like soup.", "Young people like soup.")
    assert mid.fill("Old", "Young") == ("I think old people like soup.", "I think young people like soup.")
    assert mid.fill("Danish", "Dutch")[0] == "I think Danish people like soup."  # a proper adjective keeps its capital


def test_swapped_pairs_stay_in_their_category_and_never_repeat_a_pairs_own_contrast() -> None:
    cats = ["age", "age", "age", "height"]
    more = ["The old clerk sang.", "An old man ran.", "Young dogs bark.", "The tall cook slept."]
    less = ["The young clerk sang.", "An young man ran.", "Old dogs bark.", "The short cook slept."]
    out = swapped_pairs(cats, more, less, per_pair=5, seed=0)
    # pair 0 and 1 share the contrast old/young: each only takes pair 2's young/old, and
    # pair 2 takes 0's and 1's; the lone height pair has no partner
    assert sorted(out) == sorted([("The young clerk sang.", "The old clerk sang."),
                                  ("An young man ran.", "An old man ran."),
                                  ("Old dogs bark.", "Young dogs bark."),
                                  ("Old dogs bark.", "Young dogs bark.")])
    assert swapped_pairs(cats, more, less, per_pair=0) == []


@pytest.mark.skipif(not CROWS.exists(), reason="needs ../shared/data/crows_pairs")
def test_on_crows_pairs_most_rows_give_a_slot_and_new_pairs_use_only_the_given_rows_terms() -> None:
    with CROWS.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    more, less, cats = [r["sent_more"] for r in rows], [r["sent_less"] for r in rows], [r["bias_type"] for r in rows]
    assert sum(slot(a, b) is not None for a, b in zip(more, less, strict=True)) / len(rows) > 0.8
    sub = list(range(0, 400, 2))
    out = swapped_pairs([cats[i] for i in sub], [more[i] for i in sub], [less[i] for i in sub], per_pair=3, seed=1)
    assert 2 * len(sub) < len(out) <= 3 * len(sub)
    originals = {(more[i], less[i]) for i in range(len(rows))}
    assert not originals & set(out)  # every new pair is new
    words = {w.strip(".,;:!?\"')").lower() for i in sub for w in (more[i] + " " + less[i]).split()}
    for a, b in out:
        assert {w.strip(".,;:!?\"')").lower() for w in (a + " " + b).split()} <= words
