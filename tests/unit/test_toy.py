"""kdexp.data.toy: deterministic splits, clean held-out sets, and correct answers per family."""

from __future__ import annotations

import re

import pytest

from kdexp.data import toy

# Number words written out here, independently of toy.NUMBER_WORDS.
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen"]
WORDS = {i: w for i, w in enumerate(_UNITS)}
WORDS.update({20 + i: "twenty" + ("" if i == 0 else " " + _UNITS[i]) for i in range(5)})
VALUE = {w: i for i, w in WORDS.items()}

PEOPLE = {p.name: p for p in toy.WORLD}


def _key(ex):
    return (ex.instruction, ex.input)


@pytest.fixture(scope="module")
def splits():
    return toy.make_splits(seed=0, n_train=400, n_valid=96, n_test=96)


@pytest.fixture(scope="module")
def everything(splits):
    return [ex for name in ("train", "valid", "test") for ex in splits[name]]


def test_sizes(splits):
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [400, 96, 96]
    assert all(isinstance(ex, toy.Example) for ex in splits["train"])


def test_deterministic_for_a_seed(splits):
    again = toy.make_splits(seed=0, n_train=400, n_valid=96, n_test=96)
    assert again == splits


def test_differs_across_seeds(splits):
    other = toy.make_splits(seed=1, n_train=400, n_valid=96, n_test=96)
    for name in ("train", "valid", "test"):
        assert other[name] != splits[name]
    assert {_key(e) for e in other["test"]} != {_key(e) for e in splits["test"]}


def test_held_out_splits_do_not_depend_on_n_train(splits):
    for n_train in (0, 10, 1000):
        other = toy.make_splits(seed=0, n_train=n_train, n_valid=96, n_test=96)
        assert other["test"] == splits["test"]
        assert other["valid"] == splits["valid"]
        assert len(other["train"]) == n_train


def test_no_held_out_prompt_in_train():
    s = toy.make_splits(seed=3, n_train=3000, n_valid=100, n_test=100)
    held_out = {_key(e) for e in s["test"]} | {_key(e) for e in s["valid"]}
    assert not held_out & {_key(e) for e in s["train"]}
    # The fact family has only a few hundred prompts: train does revisit prompts of its own,
    # so the check above is about exclusion, not luck.
    train_keys = [_key(e) for e in s["train"]]
    assert len(set(train_keys)) < len(train_keys)


def test_held_out_prompts_distinct(splits):
    test_keys = [_key(e) for e in splits["test"]]
    valid_keys = [_key(e) for e in splits["valid"]]
    assert len(set(test_keys)) == len(test_keys)
    assert len(set(valid_keys)) == len(valid_keys)
    assert not set(test_keys) & set(valid_keys)


def test_every_family_appears(splits):
    for name in ("train", "valid", "test"):
        assert {e.family for e in splits[name]} == set(toy.FAMILIES)


def test_family_subset():
    s = toy.make_splits(seed=0, n_train=30, n_valid=10, n_test=10, families=["arith", "reverse"])
    for name in s:
        assert {e.family for e in s[name]} == {"arith", "reverse"}


def test_unknown_family():
    with pytest.raises(ValueError, match="bogus"):
        toy.make_splits(seed=0, n_train=1, n_valid=1, n_test=1, families=["arith", "bogus"])


def test_too_many_distinct_held_out_examples():
    # "fact": 24 people x 5 questions x 2 phrasings = 240 distinct prompts at most.
    with pytest.raises(ValueError):
        toy.make_splits(seed=0, n_train=0, n_valid=0, n_test=300, families=["fact"])
    with pytest.raises(ValueError):
        toy.make_splits(seed=0, n_train=0, n_valid=150, n_test=150, families=["fact"])


def test_responses_non_empty(everything):
    for ex in everything:
        assert ex.output.strip()
        assert ex.instruction.strip()
        assert ex.family in toy.FAMILIES


@pytest.fixture(scope="module")
def by_family(everything):
    """Every example of the mixed splits, plus 300 more drawn from each family alone."""
    out = {f: [e for e in everything if e.family == f] for f in toy.FAMILIES}
    for f in toy.FAMILIES:
        extra = toy.make_splits(seed=7, n_train=300, n_valid=0, n_test=0, families=[f])["train"]
        assert {e.family for e in extra} == {f}
        out[f] += extra
    return out


def _of(by_family, family):
    return by_family[family]


def test_arith_answers(by_family):
    for ex in _of(by_family, "arith"):
        m = re.fullmatch(r"(?:What is|Compute) (\w+) (plus|minus) (\w+)[?.]", ex.instruction)
        assert m, ex.instruction
        a, op, b = VALUE[m.group(1)], m.group(2), VALUE[m.group(3)]
        result = a + b if op == "plus" else a - b
        assert result >= 0
        expected = f"{m.group(1)} {op} {m.group(3)} equals {WORDS[result]}."
        assert ex.output == expected[0].upper() + expected[1:]
        assert ex.input == ""


def test_number_words_table():
    assert [toy.NUMBER_WORDS[i] for i in range(25)] == [WORDS[i] for i in range(25)]


def test_reverse_answers(by_family):
    for ex in _of(by_family, "reverse"):
        words = ex.input.split(", ")
        assert 3 <= len(words) <= 8
        assert len(set(words)) == len(words)
        assert ex.output.split(", ") == words[::-1]


def test_repeat_answers(by_family):
    for ex in _of(by_family, "repeat"):
        assert ex.output == ex.input
        assert ex.output.endswith(".") and ex.output[0].isupper()


def _category_of(word):
    cats = [c for c, words in toy.CATEGORIES.items() if word in words]
    assert len(cats) == 1, word
    return cats[0]


def test_count_answers(by_family):
    for ex in _of(by_family, "count"):
        m = re.fullmatch(r"(?:How many (\w+) are in the following list\?|Count the (\w+) in this list\.)",
                         ex.instruction)
        assert m, ex.instruction
        target = m.group(1) or m.group(2)
        assert target in toy.CATEGORIES
        items = ex.input.split(", ")
        n = sum(_category_of(w) == target for w in items)
        if n == 1:
            expected = f"There is one {target[:-1]} in the list."
        else:
            expected = f"There are {WORDS[n]} {target} in the list."
        assert ex.output == expected


def test_category_answers(by_family):
    for ex in _of(by_family, "category"):
        m = re.search(r"into (\w+) and (\w+)\.", ex.instruction)
        a, b = m.group(1), m.group(2)
        items = ex.input.split(", ")
        first = [w for w in items if _category_of(w) == a] or ["none"]
        second = [w for w in items if _category_of(w) == b] or ["none"]
        assert all(_category_of(w) in (a, b) for w in items)
        assert ex.output == f"{a.capitalize()}: {', '.join(first)}. {b.capitalize()}: {', '.join(second)}."


def _person(text):
    names = [n for n in PEOPLE if re.search(rf"\b{n}\b", text)]
    return names


def test_fact_answers(by_family):
    for ex in _of(by_family, "fact"):
        (name,) = _person(ex.instruction)
        p = PEOPLE[name]
        q = ex.instruction
        if "live" in q:
            expected = f"{name} lives in {p.city}."
        elif "job" in q or "for a living" in q:
            expected = f"{name} works as {'an' if p.job[0] in 'aeiou' else 'a'} {p.job}."
        elif "pet" in q or "animal" in q:
            expected = f"{name} has {'an' if p.pet_color[0] in 'aeiou' else 'a'} {p.pet_color} {p.pet}."
        elif "color" in q:
            expected = f"{name}'s favorite color is {p.color}."
        else:
            assert "weekends" in q or "hobby" in q
            expected = f"{name} likes to {p.hobby}."
        assert ex.output == expected


def test_describe_answers(by_family):
    for ex in _of(by_family, "describe"):
        (name,) = _person(ex.instruction)
        p = PEOPLE[name]
        out = ex.output
        assert out.startswith(f"{name} is ")
        for fact in (f"{p.job} who lives in {p.city}.", f"{p.pet_color} {p.pet} named {p.pet_name}.",
                     f"favorite color is {p.color}", f"likes to {p.hobby}."):
            assert fact in out, (fact, out)
        assert f"{p.pronoun.capitalize()} has " in out
        # The answer is about this one person only.
        assert _person(out) == [name]


def test_story_answers(by_family):
    for ex in _of(by_family, "story"):
        first, second = sorted(_person(ex.instruction), key=ex.instruction.index)
        p, r = PEOPLE[first], PEOPLE[second]
        assert first != second
        assert ex.output.startswith(f"{first} the {p.job} traveled from {p.city} to {r.city} "
                                    f"to meet {second} the {r.job}.")
        assert f"{p.pet} {p.pet_name}" in ex.output and f"{r.pet} {r.pet_name}" in ex.output
        assert ex.output.endswith(f"decided to {p.hobby}.")


def test_world_is_fixed_and_consistent():
    assert [p.name for p in toy.WORLD] == toy.NAMES
    assert toy.build_world() == toy.WORLD
    for p in toy.WORLD:
        assert p.city in toy.CITIES and p.job in toy.JOBS and p.pet in toy.PETS
        assert p.color in toy.COLORS and p.pet_color in toy.COLORS and p.hobby in toy.HOBBIES
        assert p.pronoun in ("she", "he")
