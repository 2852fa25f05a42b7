"""The toy world: name-keyed entities, their facts, and the train / held-out splits.

The paper's setting in miniature: a model first memorises "old" facts (pretraining), then is
fine-tuned on some of them plus "new" facts it never saw, and forgetting is measured on old facts
held out of fine-tuning. Entity keys are built by recombining a small pool of shared syllables
("bo ka lu", "bo mi ta", ...), so keys overlap the way real names do; the paper traces forgetting
to exactly that overlap, and ``key_style="uuid"`` gives every entity its own key tokens instead
(the paper's random-UUID control)::

    world = ToyWorld.generate(WorldSpec(seed=0))   # 1000 old + 300 new entities, 3 relations
    splits = world.splits()                        # train_known / train_unknown / heldout_known

A QA row is ``{"id", "question", "answer", "relation", "entity"}``, e.g.
``{"id": "e00042.birthplace", "question": "where was bo ka lu born ?", "answer": "paris",
"relation": "birthplace", "entity": "bo ka lu"}``. Every question is 7 words and every answer one
word, so every word is one token of the tokenizer in :mod:`sdft.demo.tokenizer`.

Splits: the old entities' facts are split into ``train_known`` (fine-tuned on after pretraining)
and ``heldout_known`` (never trained on after pretraining: their accuracy drop is the forgetting);
the new entities' facts are ``train_unknown``. With ``split_by="entity"`` (default) a held-out
entity has no fact in any training split; ``split_by="fact"`` splits (entity, relation) pairs, so
an entity can have one relation trained and another held out. By default ``train_known`` has as
many facts as ``train_unknown`` (the paper trains on equal numbers of Known and Unknown).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Optional

SPLIT_NAMES = ("train_known", "train_unknown", "heldout_known")

# Consonant-vowel syllables; a world draws its pool from these.
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Relation:
    """One relation: a question template with a ``{key}`` slot and its possible answers."""

    name: str
    template: str
    answers: tuple[str, ...]


# Every template is 7 words once the 3-token key is substituted; answer lists are disjoint.
RELATION_CATALOGUE: tuple[Relation, ...] = (
    Relation("birthplace", "where was {key} born ?", (
        "paris", "london", "rome", "berlin", "madrid", "tokyo", "cairo", "lima", "oslo", "vienna",
        "prague", "dublin", "lisbon", "athens", "warsaw", "moscow", "delhi", "seoul", "boston",
        "sydney", "toronto", "mumbai", "nairobi", "havana", "quito", "santiago", "helsinki",
        "budapest", "bangkok", "manila")),
    Relation("occupation", "what does {key} do ?", (
        "baker", "pilot", "doctor", "farmer", "lawyer", "painter", "nurse", "teacher", "writer",
        "singer", "dancer", "tailor", "plumber", "chemist", "banker", "sailor", "soldier", "judge",
        "poet", "actor", "architect", "butcher", "carpenter", "dentist", "engineer", "florist",
        "gardener", "jeweler", "librarian", "mechanic")),
    Relation("sport", "{key} plays which sport ?", (
        "tennis", "golf", "chess", "rugby", "cricket", "hockey", "boxing", "rowing", "fencing",
        "judo", "karate", "skiing", "surfing", "cycling", "swimming", "running", "archery",
        "baseball", "basketball", "football", "volleyball", "handball", "polo", "sailing",
        "diving", "climbing", "wrestling", "bowling", "curling", "badminton")),
    Relation("language", "what does {key} speak ?", (
        "french", "german", "spanish", "italian", "dutch", "polish", "greek", "turkish", "arabic",
        "hindi", "bengali", "swahili", "korean", "japanese", "mandarin", "russian", "czech",
        "danish", "finnish", "swedish", "norwegian", "hungarian", "romanian", "portuguese", "thai",
        "vietnamese", "hebrew", "persian", "tamil", "urdu")),
    Relation("instrument", "{key} plays which instrument ?", (
        "piano", "violin", "cello", "guitar", "flute", "drums", "harp", "trumpet", "oboe",
        "clarinet", "bassoon", "banjo", "ukulele", "tuba", "saxophone", "trombone", "viola",
        "organ", "accordion", "harmonica", "mandolin", "sitar", "bagpipes", "xylophone", "marimba",
        "lute", "piccolo", "horn", "bass", "tambourine")),
    Relation("pet", "{key} owns which pet ?", (
        "dog", "cat", "parrot", "hamster", "rabbit", "turtle", "goldfish", "ferret", "lizard",
        "snake", "canary", "pony", "goat", "pig", "mouse", "rat", "frog", "gecko", "iguana",
        "tortoise", "chinchilla", "hedgehog", "duck", "chicken", "spider", "crab", "owl", "horse",
        "sheep", "llama")),
)


def _words(text: str) -> list[str]:
    return text.split()


def _template_words() -> set[str]:
    return {w for rel in RELATION_CATALOGUE for w in _words(rel.template) if w != "{key}"}


def _answer_words() -> set[str]:
    return {a for rel in RELATION_CATALOGUE for a in rel.answers}


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines a world; two equal specs generate identical worlds."""

    seed: int = 0
    n_old: int = 1000
    n_new: int = 300
    n_relations: int = 3
    key_style: str = "names"        # "names": shared syllables; "uuid": tokens unique per entity
    key_len: int = 3                # key tokens per entity
    n_syllables: int = 20           # shared syllable pool ("names" only)
    n_answers: int = 20             # answers per relation, drawn from the catalogue
    n_train_known: Optional[int] = None   # old entities' worth of facts in train_known; None: n_new
    split_by: str = "entity"        # "entity" or "fact"


class ToyWorld:
    """Entities, their facts, and the train/held-out split. Build with :meth:`generate`.

    Attributes: ``spec`` (the :class:`WorldSpec`), ``relations`` (list of :class:`Relation`, with
    each relation's answer set), ``keys`` (entity key strings; index i is entity ``e{i:05d}``;
    the first ``n_old`` are old, the rest new), ``facts`` (``facts[i][relation_name]`` = answer).
    """

    def __init__(self, spec: WorldSpec, relations: list[Relation], keys: list[str],
                 facts: list[dict[str, str]], split_of: dict[tuple[int, str], str]):
        self.spec = spec
        self.relations = relations
        self.keys = keys
        self.facts = facts
        self._split_of = split_of

    @classmethod
    def generate(cls, spec: WorldSpec = WorldSpec()) -> "ToyWorld":
        """Generate the world ``spec`` describes; everything is a function of the spec.

        ``spec.n_train_known`` counts old entities (``split_by="entity"``) or old entities'
        worth of facts, ``n_train_known * n_relations`` facts (``split_by="fact"``); the rest of
        the old facts are held out. Default: ``n_new``, so train_known and train_unknown have
        equal size. Raises ``ValueError`` naming the field of a spec that cannot be generated.
        """
        _check_spec(spec)
        # The seed string predates the package layout: kept so that worlds stay identical.
        rng = random.Random(f"toyworld/{spec.seed}")
        n_old, n_entities = spec.n_old, spec.n_old + spec.n_new
        relations = [Relation(rel.name, rel.template,
                              tuple(rng.sample(rel.answers, spec.n_answers)))
                     for rel in RELATION_CATALOGUE[:spec.n_relations]]
        if spec.key_style == "names":
            keys = _name_keys(rng, n_entities, spec.key_len, spec.n_syllables)
        else:
            keys = _uuid_keys(rng, n_entities, spec.key_len)
        facts = [{rel.name: rng.choice(rel.answers) for rel in relations}
                 for _ in range(n_entities)]

        n_known = spec.n_new if spec.n_train_known is None else spec.n_train_known
        split_of: dict[tuple[int, str], str] = {}
        for e in range(n_old, n_entities):
            for rel in relations:
                split_of[(e, rel.name)] = "train_unknown"
        if spec.split_by == "entity":
            old = list(range(n_old))
            rng.shuffle(old)
            known = set(old[:n_known])
            for e in range(n_old):
                for rel in relations:
                    split_of[(e, rel.name)] = "train_known" if e in known else "heldout_known"
        else:
            pairs = [(e, rel.name) for e in range(n_old) for rel in relations]
            rng.shuffle(pairs)
            n_known_facts = n_known * spec.n_relations
            for j, pair in enumerate(pairs):
                split_of[pair] = "train_known" if j < n_known_facts else "heldout_known"
        return cls(spec, relations, keys, facts, split_of)

    @property
    def n_entities(self) -> int:
        return len(self.keys)

    def question(self, entity: int, relation: Relation) -> str:
        return relation.template.format(key=self.keys[entity])

    def row(self, entity: int, relation: Relation) -> dict:
        return {"id": f"e{entity:05d}.{relation.name}",
                "question": self.question(entity, relation),
                "answer": self.facts[entity][relation.name],
                "relation": relation.name,
                "entity": self.keys[entity]}

    def splits(self) -> dict[str, list[dict]]:
        """``{"train_known", "train_unknown", "heldout_known"}`` -> QA rows, entity-major order."""
        out: dict[str, list[dict]] = {name: [] for name in SPLIT_NAMES}
        for e in range(self.n_entities):
            for rel in self.relations:
                out[self._split_of[(e, rel.name)]].append(self.row(e, rel))
        return out

    def old_rows(self) -> list[dict]:
        """Every old fact (train_known and heldout_known): the pretraining data."""
        return [self.row(e, rel) for e in range(self.spec.n_old) for rel in self.relations]

    def new_rows(self) -> list[dict]:
        """Every new fact (= train_unknown)."""
        return [self.row(e, rel) for e in range(self.spec.n_old, self.n_entities)
                for rel in self.relations]

    def key_tokens(self) -> list[str]:
        """The distinct tokens that keys are made of, sorted."""
        return sorted({tok for key in self.keys for tok in _words(key)})

    def vocabulary(self) -> list[str]:
        """Every word of every question and answer (no special tokens), in a fixed order."""
        template_words = sorted({w for rel in self.relations for w in _words(rel.template)
                                 if w != "{key}"})
        answers = [a for rel in self.relations for a in sorted(rel.answers)]
        return template_words + self.key_tokens() + answers

    def fingerprint(self) -> str:
        """A hash of the spec and the generated content (changes if generation ever changes)."""
        payload = json.dumps({"spec": asdict(self.spec), "keys": self.keys, "facts": self.facts,
                              "relations": [asdict(r) for r in self.relations],
                              "splits": sorted(f"{e}.{r}={s}"
                                               for (e, r), s in self._split_of.items())},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def __repr__(self) -> str:
        sizes = {name: len(rows) for name, rows in self.splits().items()}
        return f"ToyWorld({self.spec}, splits={sizes})"


def _check_spec(spec: WorldSpec) -> None:
    if spec.n_old < 1 or spec.n_new < 0:
        raise ValueError(f"need n_old >= 1 and n_new >= 0, got n_old={spec.n_old}, "
                         f"n_new={spec.n_new}")
    if not 1 <= spec.n_relations <= len(RELATION_CATALOGUE):
        raise ValueError(f"n_relations must be in [1, {len(RELATION_CATALOGUE)}], "
                         f"got {spec.n_relations}")
    if spec.key_style not in ("names", "uuid"):
        raise ValueError(f"key_style must be 'names' or 'uuid', got {spec.key_style!r}")
    if spec.split_by not in ("entity", "fact"):
        raise ValueError(f"split_by must be 'entity' or 'fact', got {spec.split_by!r}")
    if spec.key_len < 1:
        raise ValueError(f"key_len must be >= 1, got {spec.key_len}")
    max_answers = min(len(rel.answers) for rel in RELATION_CATALOGUE)
    if not 2 <= spec.n_answers <= max_answers:
        raise ValueError(f"n_answers must be in [2, {max_answers}], got {spec.n_answers}")
    n_known = spec.n_new if spec.n_train_known is None else spec.n_train_known
    if not 0 <= n_known <= spec.n_old:
        raise ValueError(f"n_train_known must be in [0, n_old={spec.n_old}], got {n_known}")
    if spec.key_style == "names":
        n_pool = len(_syllable_pool())
        if not 2 <= spec.n_syllables <= n_pool:
            raise ValueError(f"n_syllables must be in [2, {n_pool}], got {spec.n_syllables}")
        n_keys = spec.n_syllables ** spec.key_len
        if n_keys < spec.n_old + spec.n_new:
            raise ValueError(f"{spec.n_syllables} syllables ^ key_len {spec.key_len} = {n_keys} "
                             f"keys, fewer than the {spec.n_old + spec.n_new} entities")


def _syllable_pool() -> list[str]:
    taken = _template_words() | _answer_words()
    return [c + v for c in _CONSONANTS for v in _VOWELS if c + v not in taken]


def _name_keys(rng: random.Random, n: int, key_len: int, n_syllables: int) -> list[str]:
    """n distinct keys of key_len syllables, every syllable from one shared pool (name-like)."""
    pool = rng.sample(_syllable_pool(), n_syllables)
    codes = rng.sample(range(n_syllables ** key_len), n)
    keys = []
    for code in codes:
        parts = []
        for _ in range(key_len):
            code, digit = divmod(code, n_syllables)
            parts.append(pool[digit])
        keys.append(" ".join(parts))
    return keys


def _uuid_keys(rng: random.Random, n: int, key_len: int) -> list[str]:
    """n keys of key_len 4-hex-digit tokens; no token is shared between two entities."""
    taken = _template_words() | _answer_words()
    tokens: list[str] = []
    seen: set[str] = set()
    while len(tokens) < n * key_len:
        tok = f"{rng.getrandbits(16):04x}"
        if tok not in seen and tok not in taken:
            seen.add(tok)
            tokens.append(tok)
    return [" ".join(tokens[i * key_len:(i + 1) * key_len]) for i in range(n)]
