"""rose_trl.data.properties: property targets on real text, as minimal pairs in both directions, sharing one pool."""

from pathlib import Path

import pytest

from rose_trl.data.properties import (
    DEFAULT_PROPERTIES,
    PROPERTIES,
    PropertyTask,
    _Answer,
    build_property_task,
    first_difference,
    minimal_pair,
    property_suite,
    target_name,
)
from rose_trl.data.realtext import RealTask


RELEASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rose"
needs_release = pytest.mark.skipif(
    not (RELEASE / "test").is_dir(), reason=f"{RELEASE}/test (the paper's test answers) is not on this machine"
)
# Small, slice-only sizes: every property of DEFAULT_PROPERTIES fits them without the test answers.
SMALL = dict(pool_sizes={"se": 60, "hh": 30}, pool_min=10, n_validation=12, heldout_dev=6, heldout_test=10)


def _answer(text, other=None, task="se"):
    return _Answer("\n\nHuman: q\n\nAssistant:", text, task, "x", "slice", other)


@pytest.mark.parametrize(
    "name, text, without",
    [
        (
            "se_link",
            ' <p>See <a href="http://x.org/a" rel="nofollow">the manual</a> first.</p>',
            " <p>See the manual first.</p>",
        ),
        (
            "se_code",
            " <p>Run <code>ls -l</code>:</p>\n<pre><code>ls -l\n</code></pre>",
            " <p>Run ls -l:</p>\n<p>ls -l\n</p>",
        ),
        ("se_emphasis", " <p>It is <strong><em>not</em></strong> <b>safe</b>.</p>", " <p>It is not safe.</p>"),
        ("se_quote", " <blockquote>\n<p>Quoted.</p>\n</blockquote>\n<p>Mine.</p>", " <p>Quoted.</p>\n<p>Mine.</p>"),
        (
            "se_list",
            " <p>Steps:</p>\n<ul>\n<li>one</li>\n<li><p>two</p></li>\n</ul>",
            " <p>Steps:</p>\n<p>one</p>\n<p>two</p>",
        ),
        (
            "hh_question",
            " That sounds hard.  I can help with that! What have you tried? Did it work?",
            " That sounds hard.  I can help with that!",
        ),
    ],
)
def test_each_removal_gives_the_same_answer_without_only_the_property(name, text, without):
    prop = PROPERTIES[name]
    assert prop.detect(text) and not prop.detect(without)
    assert minimal_pair(prop, _answer(text, task=prop.task)) == (text, without)


@pytest.mark.parametrize(
    "name, text",
    [
        ("se_link", ' <p>At <a href="http://x.org">http://x.org</a>.</p>'),  # the link's text is the URL itself
        ("se_link", " <p>At https://x.org you will find it.</p>"),  # a bare URL: nothing to unwrap
        ("hh_question", " What do you mean?"),  # nothing left once the question goes
        ("hh_question", " Fine, thanks."),  # no property at all
    ],
)
def test_answers_without_a_clean_removal_give_no_pair(name, text):
    assert minimal_pair(PROPERTIES[name], _answer(text, task=PROPERTIES[name].task)) is None


def test_a_property_without_removal_pairs_with_the_other_answer_to_the_same_prompt():
    decline = PROPERTIES["hh_decline"]
    assert decline.remove is None and "counterpart" in decline.removal
    assert minimal_pair(decline, _answer(" I can't help with that.", " Sure, here it is.", "hh")) == (
        " I can't help with that.",
        " Sure, here it is.",
    )
    assert minimal_pair(decline, _answer(" I can't help with that.", " I won't.", "hh")) is None  # both decline
    assert minimal_pair(decline, _answer(" I can't help with that.", None, "hh")) is None  # a test answer: no other


def test_first_difference():
    assert (
        first_difference("abcd", "abxd") == 2
        and first_difference("ab", "abc") == 2
        and first_difference("a", "a") == 1
    )


@pytest.fixture(scope="module")
def suite():
    return property_suite(**SMALL)


def test_the_suite_keeps_prompts_apart_and_meets_its_sizes(suite):
    assert suite.properties == DEFAULT_PROPERTIES
    counts = suite.counts()
    pool_prompts = set(suite.pool["prompt"])
    assert len(pool_prompts) == len(suite.pool) == 90  # one answer per prompt
    seen = set(pool_prompts)
    for name in suite.properties:
        c = counts[name]
        assert c["validation"] == 12 and (c["dev"], c["test"]) == (6, 10) and c["pool_with"] >= 10
        for pair in suite.validation[name] + suite.heldout[name]:
            assert pair["prompt"] not in seen  # no prompt serves twice, across properties too
            seen.add(pair["prompt"])
    assert {t: suite.pool["task"].count(t) for t in ("se", "hh")} == {"se": 60, "hh": 30}


def test_pairs_are_minimal_visible_and_within_the_size_cap(suite):
    for name in suite.properties:
        prop = PROPERTIES[name]
        for pair in suite.validation[name] + suite.heldout[name]:
            assert prop.detect(pair["with"]) and not prop.detect(pair["without"])
            assert prop.remove(pair["with"]) == pair["without"]  # only the property was removed
            assert max(len(pair["with"]), len(pair["without"])) <= 1000
            assert first_difference(pair["with"], pair["without"]) < 250
            assert pair["source"] == "slice"


def test_pool_labels_read_the_same_on_the_visible_window(suite):
    for row in suite.pool:
        assert len(row["completion"]) <= 1000
        for name in suite.properties:
            detect = PROPERTIES[name].detect
            assert row[f"has_{name}"] == detect(row["completion"]) == detect(row["completion"][:250])


def test_targets_share_the_pool_and_flip_with_the_direction(suite):
    prefer, avoid = suite.task("se_link", "prefer", k=5), suite.task("se_link", "avoid", k=5)
    assert isinstance(prefer, PropertyTask) and isinstance(prefer, RealTask)
    assert prefer.target == target_name("se_link", "prefer") == "se_link_prefer" and avoid.direction == "avoid"
    other = suite.task("hh_question", "prefer", k=3)

    def strip(ds):
        return ds.remove_columns(["answer"]).to_list()

    assert strip(prefer.pool) == strip(avoid.pool) == strip(other.pool)  # one pool for every target
    for row_p, row_a in zip(prefer.pool, avoid.pool, strict=True):
        if row_p["task"] != "se":
            assert row_p["answer"] == row_a["answer"] == "other"
        else:
            assert row_p["answer"] == ("chosen" if row_p["has_se_link"] else "rejected")
            assert {row_p["answer"], row_a["answer"]} == {"chosen", "rejected"}
    assert len(prefer.validation) == 5 and set(prefer.validation["subtask"]) == {"se_link_prefer"}
    # The suite holds every pair of the property; a target its first k (5).
    for p, a, raw in zip(prefer.validation, avoid.validation, suite.validation["se_link"], strict=False):
        assert (p["chosen"], p["rejected"]) == (a["rejected"], a["chosen"]) == (raw["with"], raw["without"])
    assert prefer.heldout["half"].count("test") == 10 and set(prefer.heldout.column_names) >= {"half", "source"}
    assert [r["chosen"] for r in avoid.heldout] == [r["rejected"] for r in prefer.heldout]
    hh = [r for r in other.pool if r["task"] == "hh"]
    assert all(r["answer"] == ("chosen" if r["has_hh_question"] else "rejected") for r in hh)


def test_the_suite_is_a_function_of_its_options(suite):
    again = property_suite(**SMALL)
    assert again.pool.to_list() == suite.pool.to_list() and again.validation == suite.validation
    other = property_suite(**{**SMALL, "seed": 1})
    assert other.pool["prompt"] != suite.pool["prompt"]
    task = build_property_task("se_code", "avoid", k=4, **SMALL)
    assert task.pool.remove_columns(["answer"]).to_list() == suite.pool.to_list()
    assert task.validation.to_list() == suite.task("se_code", "avoid", 4).validation.to_list()


def test_bad_requests_name_what_is_wrong(suite):
    with pytest.raises(ValueError, match="unknown properties"):
        property_suite(properties=["se_nonsense"])
    with pytest.raises(ValueError, match="k = 13, the suite holds 12"):
        suite.task("se_link", k=13)
    with pytest.raises(ValueError, match="direction"):
        suite.task("se_link", "sideways")
    with pytest.raises(ValueError, match="not in this suite"):
        suite.task("se_quote")
    with pytest.raises(ValueError, match=r"hh_question: 90 held-out pairs wanted .*the slice \(no test_root given\)"):
        property_suite(**{**SMALL, "heldout_dev": 40, "heldout_test": 50})
    with pytest.raises(FileNotFoundError, match="copy of the release"):
        property_suite(**SMALL, test_root="/nonexistent")


@needs_release
def test_held_out_pairs_come_from_the_papers_test_answers_where_present():
    suite = property_suite(test_root=RELEASE)
    counts = suite.counts()
    for name in DEFAULT_PROPERTIES:
        assert (
            counts[name]["test"] == 80 and counts[name]["dev"] == 40 and counts[name]["validation"] >= 40
        )  # hh_question: the 43 the slice holds
        assert {p["source"] for p in suite.heldout[name]} == {"test"}
        assert {p["source"] for p in suite.validation[name]} == {"slice"}
    assert len(suite.pool) == 200 and all(c["pool_with"] >= 30 for c in counts.values())


def test_property_counts_match_a_count_by_hand():
    from rose_trl.data.properties import _fits, _slice_answers, property_counts

    counts = property_counts(["se_code", "hh_decline"])
    assert set(counts) == {"se_code", "hh_decline"} and "test_answers" not in counts["se_code"]
    for name, c in counts.items():
        prop = PROPERTIES[name]
        answers = [a for a in _slice_answers(prop.task) if _fits(a, 1000)]
        assert c["slice_answers"] == len(answers) and c["slice_with"] == sum(prop.detect(a.text) for a in answers)
        prompts = {
            a.prompt
            for a in answers
            if (pair := minimal_pair(prop, a)) and len(pair[1]) <= 1000 and first_difference(*pair) < 250
        }
        assert c["slice_pair_prompts"] == len(prompts)
    assert counts["hh_decline"]["slice_pair_prompts"] < 20  # too few for a suite: why it is not a default


def test_validation_pairs_fit_the_validation_cap(suite):
    for name in suite.properties:
        assert all(len(p["with"]) <= 450 and len(p["without"]) <= 450 for p in suite.validation[name])
    assert any(len(p["with"]) > 450 for name in suite.properties for p in suite.heldout[name])  # held-out: 1000
