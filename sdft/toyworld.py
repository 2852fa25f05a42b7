"""A generated closed-book QA world, its word-level tokenizer, and a tiny pretrained Llama.

The paper's setting in miniature: a model first memorises "old" facts (pretraining), then is
fine-tuned on some of them plus "new" facts it never saw, and forgetting is measured on old facts
held out of fine-tuning. Entity keys are built by recombining a small pool of shared syllables
("bo ka lu", "bo mi ta", ...), so keys overlap the way real names do; the paper traces forgetting
to exactly that overlap, and ``key_style="uuid"`` gives every entity its own key tokens instead
(the paper's random-UUID control)::

    world = ToyWorld.generate(seed=0)              # 1000 old + 300 new entities, 3 relations
    splits = world.splits()                        # train_known / train_unknown / heldout_known
    tokenizer = build_tokenizer(world)
    model = pretrain(world, tokenizer, cache_dir=".cache/toyworld")   # knows every old fact

A QA row is ``{"id", "question", "answer", "relation", "entity"}``, e.g.
``{"id": "e00042.birthplace", "question": "where was bo ka lu born ?", "answer": "paris",
"relation": "birthplace", "entity": "bo ka lu"}``. Every question is 7 words and every answer one
word, so every word is one token.

Prompt format (the one definition that pretraining, fine-tuning and evaluation share): the model
sees ``<bos> question`` (the tokenizer adds ``<bos>``) and must continue with ``answer <eos>``;
:func:`format_prompt` and :func:`encode_example` are that definition, and
``sdft.evaluate.generate_answers(..., prompt_format=format_prompt)`` decodes from the same prefix.

Splits: the old entities' facts are split into ``train_known`` (fine-tuned on after pretraining)
and ``heldout_known`` (never trained on after pretraining: their accuracy drop is the forgetting);
the new entities' facts are ``train_unknown``. With ``split_by="entity"`` (default) a held-out
entity has no fact in any training split; ``split_by="fact"`` splits (entity, relation) pairs, so
an entity can have one relation trained and another held out. By default ``train_known`` has as
many facts as ``train_unknown`` (the paper trains on equal numbers of Known and Unknown).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

SPLIT_NAMES = ("train_known", "train_unknown", "heldout_known")
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
IGNORE_INDEX = -100

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
    def generate(cls, seed: int = 0, n_old: int = 1000, n_new: int = 300, n_relations: int = 3,
                 *, key_style: str = "names", key_len: int = 3, n_syllables: int = 20,
                 n_answers: int = 20, n_train_known: Optional[int] = None,
                 split_by: str = "entity") -> "ToyWorld":
        """Generate a world; everything is a function of the arguments (see :class:`WorldSpec`).

        ``n_train_known`` counts old entities (``split_by="entity"``) or old entities' worth of
        facts, ``n_train_known * n_relations`` facts (``split_by="fact"``); the rest of the old
        facts are held out. Default: ``n_new``, so train_known and train_unknown have equal size.
        """
        spec = WorldSpec(seed=seed, n_old=n_old, n_new=n_new, n_relations=n_relations,
                         key_style=key_style, key_len=key_len, n_syllables=n_syllables,
                         n_answers=n_answers, n_train_known=n_train_known, split_by=split_by)
        _check_spec(spec)
        rng = random.Random(f"toyworld/{seed}")
        n_entities = n_old + n_new
        relations = [Relation(rel.name, rel.template, tuple(rng.sample(rel.answers, n_answers)))
                     for rel in RELATION_CATALOGUE[:n_relations]]
        if key_style == "names":
            keys = _name_keys(rng, n_entities, key_len, n_syllables)
        else:
            keys = _uuid_keys(rng, n_entities, key_len)
        facts = [{rel.name: rng.choice(rel.answers) for rel in relations}
                 for _ in range(n_entities)]

        n_known = n_new if n_train_known is None else n_train_known
        split_of: dict[tuple[int, str], str] = {}
        for e in range(n_old, n_entities):
            for rel in relations:
                split_of[(e, rel.name)] = "train_unknown"
        if split_by == "entity":
            old = list(range(n_old))
            rng.shuffle(old)
            known = set(old[:n_known])
            for e in range(n_old):
                for rel in relations:
                    split_of[(e, rel.name)] = "train_known" if e in known else "heldout_known"
        else:
            pairs = [(e, rel.name) for e in range(n_old) for rel in relations]
            rng.shuffle(pairs)
            n_known_facts = n_known * n_relations
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


# ---------------------------------------------------------------------------------------------
# Prompt format: shared by pretraining, fine-tuning and evaluation.


def format_prompt(question: str) -> str:
    """The prompt text for a question; the tokenizer prepends ``<bos>``. Answer follows it."""
    return " ".join(question.split())


def encode_example(tokenizer, question: str, answer: str, *,
                   add_eos: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one QA example: ``<bos> prompt answer [<eos>]``.

    ``labels`` is -100 on the prompt and the answer (and eos) ids elsewhere; unshifted, as Hugging
    Face causal LMs expect. The prompt ids are exactly what ``tokenizer(format_prompt(question))``
    gives, so a model trained on these decodes its answer from the same prefix at evaluation.
    """
    prompt_ids = tokenizer(format_prompt(question))["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    if add_eos:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def encode_rows(tokenizer, rows: Sequence[dict], *, add_eos: bool = True) -> dict[str, Tensor]:
    """Encode and collate QA rows (``question``/``answer`` fields) into one right-padded batch."""
    from .data import PadCollator

    examples = [encode_example(tokenizer, r["question"], r["answer"], add_eos=add_eos) for r in rows]
    return PadCollator(tokenizer.pad_token_id)([{"input_ids": ids, "labels": lab} for ids, lab in examples])


# ---------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(world: ToyWorld, *, padding_side: str = "right"):
    """A word-level ``PreTrainedTokenizerFast`` over the world's vocabulary.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then :meth:`ToyWorld.vocabulary`.
    Text is lowercased and split on whitespace and punctuation; ``<bos>`` is prepended to every
    encoded text (pass ``add_special_tokens=False`` to omit it). Round-trips through
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    words = list(SPECIAL_TOKENS) + world.vocabulary()
    if len(set(words)) != len(words):
        raise ValueError("world vocabulary has duplicate words")
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, padding_side=padding_side)


# ---------------------------------------------------------------------------------------------
# Model and pretraining


def model_config(tokenizer, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                 intermediate_size: int = 512, max_position_embeddings: int = 32,
                 initializer_range: float = 0.1):
    """A tiny Llama config sized to the tokenizer (untied LM head, no dropout).

    ``initializer_range`` 0.1 rather than Llama's 0.02: measured on the default world, at 0.02
    the loss sits on the answer-prior plateau for ~150k examples (10% accuracy), at 0.1 the
    same budget reaches ~97%.
    """
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                       intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=max_position_embeddings,
                       initializer_range=initializer_range,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                       attention_dropout=0.0)


@dataclass(frozen=True)
class PretrainOptions:
    """Pretraining hyper-parameters (part of the cache key).

    The learning rate warms up linearly for ``warmup_steps``, then stays constant
    (``schedule="constant"``) or follows a cosine down to 0 at ``max_steps`` (``"cosine"``):
    at a constant rate the last few percent of facts keep flipping, the decay settles them.
    """

    lr: float = 1e-3
    batch_size: int = 32
    max_steps: int = 6000
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.0
    eval_every: int = 500
    target_accuracy: float = 1.0

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_model(config, seed: int = 0):
    """``LlamaForCausalLM(config)`` with weights drawn from ``seed`` (global RNG untouched)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@torch.no_grad()
def teacher_forced_exact_match(model, batch: dict[str, Tensor], chunk: int = 1024) -> Tensor:
    """Per-example bool [B]: every supervised token is the argmax given the gold prefix.

    For ``encode_example`` batches this equals greedy-decoding exact match (greedy reproduces the
    gold ``answer <eos>`` iff each of its tokens is the argmax after the gold prefix), at the cost
    of one forward pass.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, batch["input_ids"].shape[0], chunk):
            ids = batch["input_ids"][start:start + chunk]
            mask = batch["attention_mask"][start:start + chunk]
            labels = batch["labels"][start:start + chunk]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            ok = (logits.argmax(-1) == target) | (target == IGNORE_INDEX)
            out.append(ok.all(dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def pretrain(world: ToyWorld, tokenizer, *, config=None, seed: int = 0,
             options: PretrainOptions = PretrainOptions(), cache_dir: Optional[str] = None,
             num_threads: Optional[int] = None, log: Optional[Callable[[dict], None]] = None):
    """Train a fresh tiny Llama on the world's old facts until it answers them all.

    Plain torch loop: AdamW, the learning-rate schedule of :class:`PretrainOptions`, shuffled
    mini-batches of ``encode_example`` rows, cross-entropy on the answer and ``<eos>`` tokens
    only. Every ``options.eval_every`` steps the greedy exact match on all old facts is measured
    (one teacher-forced pass, see :func:`teacher_forced_exact_match`); training stops once it
    reaches ``options.target_accuracy`` or after ``options.max_steps``.

    Measured with the defaults on the default world (0.55M parameters, 3000 old facts), one
    thread, two such processes side by side on 2 cores: 100% after 4500-5500 steps, 105-130 s.

    Args:
        config: a ``LlamaConfig``; default ``model_config(tokenizer)``.
        seed: weights and batch order.
        cache_dir: if given, the trained model is saved under
            ``cache_dir/pretrain-<hash>`` (``save_pretrained`` plus ``pretrain.json``), the hash
            covering the world, the tokenizer vocabulary, the config, the options and the seed;
            a later call with the same hash loads it instead of training.
        num_threads: ``torch.set_num_threads`` for the duration of the call (restored after).
        log: called with a dict per evaluation (``step``, ``loss``, ``accuracy``, ``seconds``)
            and a final one with ``done=True`` (and ``cached=True`` when loaded from the cache).

    Returns the ``LlamaForCausalLM`` in eval mode, float32, on CPU.
    """
    from transformers import LlamaForCausalLM

    # A copy: building and saving a model writes into its config (architectures, dtype).
    config = model_config(tokenizer) if config is None else copy.deepcopy(config)
    if options.schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {options.schedule!r}")
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"config.vocab_size {config.vocab_size} < tokenizer size "
                         f"{len(tokenizer)}")
    key = _cache_key(world, tokenizer, config, options, seed)
    path = os.path.join(cache_dir, f"pretrain-{key[:16]}") if cache_dir else None
    if path and os.path.exists(os.path.join(path, "pretrain.json")):
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        with open(os.path.join(path, "pretrain.json")) as f:
            meta = json.load(f)
        if log:
            log({**meta["final"], "done": True, "cached": True})
        return model.eval()

    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        model, final, history = _pretrain_loop(world, tokenizer, config, seed, options, log)
    finally:
        torch.set_num_threads(old_threads)
    if path:
        _save_atomic(model, path, {"key": key, "seed": seed, "options": asdict(options),
                                   "world": asdict(world.spec), "final": final,
                                   "history": history})
    if log:
        log({**final, "done": True, "cached": False})
    return model.eval()


def _pretrain_loop(world, tokenizer, config, seed, options, log):
    model = build_model(config, seed)
    model.train()
    data = encode_rows(tokenizer, world.old_rows())
    n = data["input_ids"].shape[0]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr,
                                  weight_decay=options.weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, options.lr_factor)
    history: list[dict] = []
    start = time.perf_counter()
    order = torch.randperm(n, generator=generator)
    cursor, step, loss_sum, loss_count = 0, 0, 0.0, 0
    final = None
    while True:
        if step % options.eval_every == 0 or step == options.max_steps:
            acc = teacher_forced_exact_match(model, data).float().mean().item()
            # loss: mean training loss since the previous record (None before the first step).
            record = {"step": step, "loss": loss_sum / loss_count if loss_count else None,
                      "accuracy": acc,
                      "seconds": round(time.perf_counter() - start, 2)}
            history.append(record)
            loss_sum, loss_count = 0.0, 0
            if log:
                log(record)
            if acc >= options.target_accuracy or step >= options.max_steps:
                final = record
                break
        if cursor + options.batch_size > n:
            order = torch.randperm(n, generator=generator)
            cursor = 0
        idx = order[cursor:cursor + options.batch_size]
        cursor += options.batch_size
        width = int(data["attention_mask"][idx].sum(1).max())
        out = model(input_ids=data["input_ids"][idx, :width],
                    attention_mask=data["attention_mask"][idx, :width],
                    labels=data["labels"][idx, :width])
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += out.loss.item()
        loss_count += 1
        step += 1
    return model, final, history


def _cache_key(world, tokenizer, config, options, seed) -> str:
    config_dict = {k: v for k, v in config.to_dict().items()
                   if k not in ("transformers_version", "_name_or_path", "architectures",
                                "dtype", "torch_dtype")}
    payload = json.dumps({"world": world.fingerprint(), "vocab": tokenizer.get_vocab(),
                          "config": config_dict, "options": asdict(options), "seed": seed,
                          "format": 1}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _save_atomic(model, path: str, meta: dict) -> None:
    """Save into a temporary sibling and rename, so a concurrent reader never sees half a model."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pretrain-", dir=parent)
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "pretrain.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, path)
        except OSError:       # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
