"""A synthetic-knowledge corpus in the manner of bioS (Allen-Zhu & Li, Physics of LMs 3.1/3.3).

Every fact is known. A *world* is P people, each with a distinct multi-token name (first × last,
optionally × middle) and one value per attribute, drawn uniformly and seeded. The corpus holds E
*exposures* per person: biographies in which every attribute is stated once, with a template drawn
per sentence from that attribute's training templates and the sentence order shuffled per
biography, so the knowledge is extractable and not only memorised as one string (3.1). Each
attribute also has a template family never used in training: queries in it test extraction.

    world = FactsWorld(FactsSpec.parse("people=500,exposures=100,seed=0"))
    text, spans = world.biography(person=3, exposure=0)
    q = world.query(person=3, attribute="birth_city", family="heldout")  # q.prefix + q.value + "."

Data spec: `--data facts:people=500,exposures=100,seed=0[,middle=1]`. Documents are keyed
"p{person}/e{exposure}" and all go to the training split; the validation split is further
renderings (exposures E, E+1, ...) of people taken in turn, about val_fraction of the text, so the
validation loss measures what was stored, never a person the model could not have seen.

Byte-level tokenisation is the intended one (see docs/facts.md): names and values stay
multi-token, and a value's probability is the product of its bytes' probabilities in any tokeniser.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Iterator, NamedTuple

import numpy as np

from monoroute.errors import MonorouteError

PREFIX = "facts:"

FIRST = ("Aaron Abigail Adrian Alice Amelia Andre Anna Arthur Beatrice Benjamin Bianca Caleb Camila Carmen "
         "Cedric Clara Daniel Delia Dorian Edith Elias Elena Felix Fiona Gavin Greta Hector Helena Isaac Ingrid "
         "Jasper Julia Kai Karina Leon Lydia Marcus Maya Nadia Nathan Oliver Olga Pablo Petra Quentin Rosa "
         "Ruben Sabrina Simon Sonia Tobias Tessa Ulric Vera Victor Wanda Walter Xenia Yusuf Yvonne Zachary Zora "
         "Boris Lena").split()
MIDDLE = ("Avery Blair Cole Dale Eden Flynn Grey Hale Ivory Jude Kerry Lane Merle Noel Oakley Pryce Quinn "
          "Reese Sage Tate Umber Vale Wren Yale Zane Brook Corin Drew Ellis Frost Glen Hollis").split()
LAST = ("Abbott Barrow Castillo Delgado Eastwood Fairbanks Galloway Hargrove Ibarra Jennings Kowalski Lindqvist "
        "Marlowe Novak Okafor Pemberton Quiroga Rasmussen Sandoval Thornbury Underhill Valdez Whitlock Xiong "
        "Yamada Zeller Ashworth Blackwood Crane Dunmore Ellsworth Fontaine Grimaldi Holloway Iverson Jablonski "
        "Kingsley Lombardi Mercer Nakamura Oyelaran Prescott Quimby Rowntree Sterling Tanaka Upton Vasquez "
        "Winslow Yeats Zimmerman Albrecht Brennan Corrigan Draper Esposito Fitzgerald Greenberg Halvorsen "
        "Ishikawa Jorgensen Kaminski Larkspur Moreau").split()

MONTHS = ("January February March April May June July August September October November December").split()
CITIES = ("Amsterdam Athens Austin Bangalore Barcelona Beijing Berlin Bogota Boston Brisbane Brussels Budapest "
          "Cairo Calgary Chicago Copenhagen Dakar Dallas Denver Dublin Edinburgh Florence Geneva Glasgow Hamburg "
          "Havana Helsinki Houston Istanbul Jakarta Kyoto Lagos Lima Lisbon London Lyon Madrid Manila Melbourne "
          "Miami Milan Montreal Mumbai Munich Nairobi Naples Osaka Oslo Ottawa Paris Perth Porto Prague Quito "
          "Riga Rome Santiago Seattle Seoul Stockholm Sydney Toronto Vienna Warsaw").split()
UNIVERSITIES = tuple(f"{p} {s}" for p in ("Northfield", "Riverside", "Westbrook", "Eastgate", "Highland",
                                           "Lakeshore", "Oakridge", "Stonehill")
                     for s in ("University", "College", "Institute", "Polytechnic", "Academy"))
MAJORS = ("Anthropology Architecture Astronomy Biochemistry Biology Chemistry Classics Economics Engineering "
          "Geography Geology History Journalism Linguistics Literature Mathematics Medicine Music Neuroscience "
          "Nursing Philosophy Physics Psychology Sociology Statistics Theology Zoology Accounting Agronomy "
          "Cartography Ecology Robotics").split()
EMPLOYERS = tuple(f"{p} {s}" for p in ("Northwind", "Bluefin", "Copperleaf", "Silverline", "Redwood", "Ironbridge",
                                        "Greenfield", "Suncrest", "Moonstone", "Brightwater", "Starfall", "Oakmont")
                  for s in ("Labs", "Systems", "Foods", "Motors", "Bank", "Media", "Logistics", "Energy"))
YEARS = tuple(str(y) for y in range(1940, 2000))
ANIMALS = ("badger beaver bison camel cheetah cobra condor coyote crane dingo dolphin donkey eagle falcon ferret "
           "gazelle gecko gerbil gibbon heron hyena ibis iguana jackal jaguar kestrel koala lemur leopard llama "
           "lynx magpie marmot mole moose otter owl panda parrot pelican penguin puffin rabbit raven salmon "
           "tapir walrus weasel zebra").split()


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    templates: tuple[str, ...]  # training templates; "{n}" the full name, "{v}" the value, which ends the sentence
    heldout: str  # a template family never seen in training
    question: str = ""  # scheme 1's question-answer line, "{n}" the name (the answer follows "Answer: ")


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("birth_month", tuple(MONTHS),
              ("{n} celebrates a birthday every {v}.", "{n} was born in the month of {v}.",
               "The birthday of {n} falls in {v}.", "{n} has a birthday in {v}."),
              "Each year the family of {n} gathers for a party in {v}."),
    Attribute("birth_year", YEARS,
              ("{n} was born in the year {v}.", "{n} came into the world in {v}.",
               "The birth year of {n} is {v}.", "{n} was born back in {v}."),
              "Records list the year of birth of {n} as {v}."),
    Attribute("birth_city", tuple(CITIES),
              ("{n} was born in the city of {v}.", "{n} grew up in {v}.",
               "The hometown of {n} is {v}.", "{n} spent a childhood in {v}."),
              "{n} is a native of {v}."),
    Attribute("university", UNIVERSITIES,
              ("{n} studied at {v}.", "{n} graduated from {v}.",
               "{n} received a degree from {v}.", "The alma mater of {n} is {v}."),
              "{n} is an alumnus of {v}."),
    Attribute("major", tuple(MAJORS),
              ("{n} majored in {v}.", "{n} earned a degree in {v}.",
               "The field of study of {n} was {v}.", "In college, {n} focused on {v}."),
              "{n} chose to specialise in {v}."),
    Attribute("employer", EMPLOYERS,
              ("{n} works for {v}.", "{n} is employed by {v}.",
               "The employer of {n} is {v}.", "{n} holds a job at {v}."),
              "{n} earns a living at {v}."),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)
FAMILIES = ("train", "heldout", "qa")

# --- scheme 1: a corpus that binds (issue 30) -------------------------------------------------------------
# Scheme 0's names share parts (64 first x 64 last: at P = 100 most people are unique only by the pair) and
# three of its attributes are compositional (a year is "19" + decade + digit; universities and employers are
# prefix x suffix), so recall there mixes "how many facts" with "how hard the name is to bind" and "a fact" is
# often two choices. Scheme 1: every person has a first word and a last word no one else has (a collision-free
# two-part name: either word identifies the person), every value is one choice among unrelated words, and
# question-answer lines ("Question: Where was N born? Answer: V.") are in the biographies of half the people
# only, so QA recall on the other half tests extraction of knowledge the model never saw asked
# (Allen-Zhu & Li, Physics of LMs 3.1).
ONSETS, VOWELS, CODAS = "bdfgklmnprstvz", "aeiou", ("", "", "n", "r", "l", "s")


def invented_words(n: int, syllables: int, seed: str, exclude: frozenset = frozenset()) -> tuple[str, ...]:
    """n distinct capitalised words of `syllables` consonant-vowel syllables and an optional coda, seeded."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)
        if w not in seen:
            seen.add(w)
            out.append(w.capitalize())
    return tuple(out)


FIRST_WORDS = invented_words(4000, 2, "facts-first-words")
LAST_WORDS = invented_words(4000, 3, "facts-last-words", frozenset(w.lower() for w in FIRST_WORDS))
_TAKEN = frozenset(w.lower() for w in FIRST_WORDS + LAST_WORDS)
SCHOOLS = tuple(f"{w} University" for w in invented_words(40, 3, "facts-schools", _TAKEN))
COMPANIES = invented_words(64, 2, "facts-companies", _TAKEN | {w.split()[0].lower() for w in SCHOOLS})

BINDING_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("birth_month", tuple(MONTHS), ATTRIBUTES[0].templates, ATTRIBUTES[0].heldout,
              "In which month was {n} born?"),
    Attribute("pet", tuple(ANIMALS),
              ("{n} keeps a pet {v}.", "The pet of {n} is a {v}.", "{n} lives with a {v}.",
               "At home, {n} looks after a {v}."),
              "Neighbours often see {n} walking a {v}.", "Which animal does {n} keep?"),
    Attribute("birth_city", tuple(CITIES), ATTRIBUTES[2].templates, ATTRIBUTES[2].heldout, "Where was {n} born?"),
    Attribute("university", SCHOOLS, ATTRIBUTES[3].templates, ATTRIBUTES[3].heldout, "Where did {n} study?"),
    Attribute("major", tuple(MAJORS), ATTRIBUTES[4].templates, ATTRIBUTES[4].heldout, "What did {n} study?"),
    Attribute("employer", COMPANIES, ATTRIBUTES[5].templates, ATTRIBUTES[5].heldout, "Who employs {n}?"),
)
SCHEMES = (ATTRIBUTES, BINDING_ATTRIBUTES)
QA_PREFIX, QA_ANSWER = "Question: ", " Answer: "


@dataclass(frozen=True)
class FactsSpec:
    people: int = 500
    exposures: int = 100
    seed: int = 0
    middle: int = 0  # 1: names are first middle last (a name space 32x larger); scheme 0 only
    scheme: int = 0  # 0: the first corpus (shared name parts, compositional values); 1: the binding corpus

    @classmethod
    def parse(cls, text: str) -> "FactsSpec":
        """`people=500,exposures=100,seed=0` (any subset, any order; the `facts:` prefix is optional)."""
        body = text[len(PREFIX):] if text.startswith(PREFIX) else text
        known = {f.name for f in fields(cls)}
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in body.split(","))):
            key, eq, raw = part.partition("=")
            if not eq or key not in known:
                raise MonorouteError(f"facts spec {text!r}: {part!r} is not KEY=INT with KEY one of "
                                     f"{', '.join(sorted(known))}; e.g. facts:people=500,exposures=100,seed=0")
            if key in values:
                raise MonorouteError(f"facts spec {text!r}: {key} is given twice; give each key once")
            try:
                values[key] = int(raw)
            except ValueError:
                raise MonorouteError(f"facts spec {text!r}: {key} must be an integer, got {raw!r}") from None
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        space = name_space(self.middle, self.scheme)
        if self.people < 1 or self.exposures < 1:
            raise MonorouteError(f"facts spec: people and exposures must be >= 1, got {self.people}, {self.exposures}")
        if self.people > space:
            fix = "set middle=1 (first × middle × last)" if not self.middle else "use fewer people"
            raise MonorouteError(f"facts spec: people={self.people} is larger than the name space ({space:,} distinct "
                                 f"names); {fix}")
        if self.middle not in (0, 1):
            raise MonorouteError(f"facts spec: middle must be 0 or 1, got {self.middle}")
        if self.scheme not in (0, 1):
            raise MonorouteError(f"facts spec: scheme must be 0 (the first corpus) or 1 (the binding corpus), got "
                                 f"{self.scheme}")
        if self.scheme and self.middle:
            raise MonorouteError("facts spec: middle=1 is scheme 0's; scheme 1's names never collide, drop middle")

    def text(self) -> str:
        # scheme 0 is left out so the first corpus keeps its spec text (and its runs' token caches)
        return PREFIX + ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                                 if f.name != "scheme" or self.scheme)


def name_space(middle: int, scheme: int = 0) -> int:
    if scheme:
        return min(len(FIRST_WORDS), len(LAST_WORDS))
    return len(FIRST) * len(LAST) * (len(MIDDLE) if middle else 1)


class Span(NamedTuple):
    start: int  # byte offsets into the biography text (all text is ASCII: bytes == characters)
    end: int
    kind: str  # "name" | "value" | "text"
    attribute: int  # index into ATTRIBUTES (-1 for none)


class Query(NamedTuple):
    person: int
    attribute: int
    family: str
    prefix: str  # the sentence up to the value ("Ada Lovelace was born in the city of ")
    value: str  # the true value; the sentence continues with "."
    values: tuple[str, ...] = ()  # every value of the attribute: the multiple choice


class FactsWorld:
    """People, their facts and every rendering of them, all from (spec) alone."""

    def __init__(self, spec: FactsSpec) -> None:
        spec.check()
        self.spec = spec
        rng = random.Random(f"facts-world-{spec.seed}")
        self.attributes = SCHEMES[spec.scheme]
        if spec.scheme:
            firsts = rng.sample(FIRST_WORDS, spec.people)
            lasts = rng.sample(LAST_WORDS, spec.people)
            self.names = [f"{f} {l}" for f, l in zip(firsts, lasts)]
        else:
            picks = rng.sample(range(name_space(spec.middle)), spec.people)
            self.names = [self._name(i) for i in picks]
        # values[p][a]: index into self.attributes[a].values
        self.values = [[rng.randrange(len(a.values)) for a in self.attributes] for _ in range(spec.people)]
        # scheme 1: question-answer lines in the biographies of half the people (qa_seen), asked of the rest
        order = random.Random(f"facts-qa-{spec.seed}").sample(range(spec.people), spec.people)
        self.qa_seen = frozenset(order[:spec.people // 2]) if spec.scheme else frozenset()

    def _name(self, i: int) -> str:
        i, last = divmod(i, len(LAST))
        if self.spec.middle:
            i, middle = divmod(i, len(MIDDLE))
            return f"{FIRST[i]} {MIDDLE[middle]} {LAST[last]}"
        return f"{FIRST[i]} {LAST[last]}"

    @property
    def n_people(self) -> int:
        return self.spec.people

    def value(self, person: int, attribute: int) -> str:
        return self.attributes[attribute].values[self.values[person][attribute]]

    def families(self) -> tuple[str, ...]:
        """The query families this world has: training templates, the held-out family, and (scheme 1) QA."""
        return FAMILIES if self.spec.scheme else FAMILIES[:2]

    def qa_unseen(self) -> list[int]:
        """The people whose biographies carry no QA lines: QA recall on them tests extraction."""
        return [p for p in range(self.n_people) if p not in self.qa_seen] if self.spec.scheme else []

    def prior(self) -> list[dict]:
        """The person-blind floor, exact from the world: per attribute, the share of people holding its most
        common value (what a model that ignores the person and answers that value recalls) and the entropy
        in bits of the value frequencies (the cross-entropy of the best person-blind distribution)."""
        out = []
        for a, attr in enumerate(self.attributes):
            counts = np.bincount([v[a] for v in self.values], minlength=len(attr.values))
            freq = counts[counts > 0] / self.n_people
            out.append({"name": attr.name, "mode": attr.values[int(counts.argmax())],
                        "accuracy": float(counts.max() / self.n_people),
                        "entropy_bits": float(-(freq * np.log2(freq)).sum())})
        return out

    def biography(self, person: int, exposure: int) -> tuple[str, list[Span]]:
        """One rendering: every attribute once, a template drawn per attribute, sentences shuffled."""
        rng = random.Random(f"facts-bio-{self.spec.seed}-{person}-{exposure}")
        order = list(range(len(self.attributes)))
        rng.shuffle(order)
        templates = [rng.choice(self.attributes[a].templates) for a in order]
        if person in self.qa_seen:  # the QA lines follow the biography, in their own shuffled order
            qa = list(range(len(self.attributes)))
            rng.shuffle(qa)
            order, templates = order + qa, templates + [qa_template(self.attributes[a]) for a in qa]
        text, spans = "", []
        for a, template in zip(order, templates):
            if text:
                spans.append(Span(len(text), len(text) + 1, "text", -1))
                text += " "
            text, new = render(template, self.names[person], self.value(person, a), a, text)
            spans.extend(new)
        return text, spans

    def query(self, person: int, attribute: int, family: str = "train", draw: int = 0,
              template: int | None = None) -> Query:
        """A prompt whose next bytes are the value: a training template (number `template`, else drawn
        by (person, attribute, draw)) or the held-out family."""
        a = self.attributes[attribute]
        if family == "heldout":
            template = a.heldout
        elif family == "qa" and self.spec.scheme:
            template = qa_template(a)
        elif family == "train":
            if template is None:
                template = self.template_drawn(person, attribute, draw)
            template = a.templates[template]
        else:
            raise MonorouteError(f"unknown query family {family!r}; choose one of {', '.join(self.families())}")
        prefix = template.split("{v}")[0].replace("{n}", self.names[person])
        return Query(person, attribute, family, prefix, self.value(person, attribute), a.values)

    def template_drawn(self, person: int, attribute: int, draw: int = 0) -> int:
        rng = random.Random(f"facts-query-{self.spec.seed}-{person}-{attribute}-{draw}")
        return rng.randrange(len(self.attributes[attribute].templates))

    def documents(self, val_fraction: float) -> Iterator[tuple[str, str]]:
        """Training biographies exposure-major (every person once, then again, ...), then validation ones."""
        for e in range(self.spec.exposures):
            for p in range(self.spec.people):
                yield SplitKey(f"p{p}/e{e}", "train"), self.biography(p, e)[0]
        n_val = max(1, round(self.spec.people * self.spec.exposures * val_fraction)) if val_fraction > 0 else 0
        for i in range(n_val):
            p, extra = i % self.spec.people, i // self.spec.people
            e = self.spec.exposures + extra
            yield SplitKey(f"p{p}/e{e}", "val"), self.biography(p, e)[0]


def render(template: str, name: str, value: str, attribute: int, text: str) -> tuple[str, list[Span]]:
    """`text` + the sentence, and the sentence's spans (name mentions, the value, the rest)."""
    spans = []
    pieces = template.replace("{n}", "\0n\0").replace("{v}", "\0v\0").split("\0")
    for piece in pieces:
        if not piece:
            continue
        kind, s = ("name", name) if piece == "n" else ("value", value) if piece == "v" else ("text", piece)
        spans.append(Span(len(text), len(text) + len(s), kind, attribute if kind == "value" else -1))
        text += s
    return text, spans


def qa_template(attribute: Attribute) -> str:
    return f"{QA_PREFIX}{attribute.question}{QA_ANSWER}{{v}}."


def attribute_index(name: str, attributes: tuple[Attribute, ...] = ATTRIBUTES) -> int:
    names = [a.name for a in attributes]
    if name not in names:
        raise MonorouteError(f"unknown attribute {name!r}; choose one of {', '.join(names)}")
    return names.index(name)


class SplitKey(str):
    """A document key whose split is fixed by its source, not hashed (corpus.split_of reads it)."""

    fixed_split: str

    def __new__(cls, key: str, split: str) -> "SplitKey":
        self = super().__new__(cls, key)
        self.fixed_split = split
        return self


class FactsSource:
    """A corpus source (see corpus.py) over a FactsWorld's biographies."""

    def __init__(self, spec_text: str, val_fraction: float = 0.05) -> None:
        self.facts = FactsSpec.parse(spec_text)
        self.spec = self.facts.text()
        self.val_fraction = val_fraction

    def describe(self) -> str:
        return f"synthetic facts corpus {self.spec!r}"

    def fingerprint(self) -> dict:
        return {"facts": self.spec, "format": FORMAT}

    def documents(self) -> Iterator[tuple[str, str]]:
        yield from FactsWorld(self.facts).documents(self.val_fraction)

    def empty_reason(self) -> str:
        return f"{self.describe()} produced no text"


FORMAT = 1  # bump when the generator's output changes, so token caches are rebuilt
