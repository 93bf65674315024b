"""Binary next-byte tasks on Python source: the behaviours a circuit search explains.

Each task is a seeded generator of *pairs* of minimally different prompts. Prompt A's next byte is
`target` and prompt B's is the `alternative` (the first byte where the two completions differ),
so the model is scored on one binary choice per prompt:

    loss = mean over both members of  CE(softmax(logits[[target, alternative]]), correct)   (nats)

ln 2 = 0.693 is chance. Every prompt is drawn from a template with varied identifiers, values
and surrounding code (a random preamble of complete statements), is ASCII, fits the model's
context, and prompt + completion parses with `ast.parse`, so the byte the task asks for is the
one Python itself requires (or the one its style makes all but certain).

Gao et al. 2025 posed 20 such tasks to BPE models; theirs are not public, so these are ours, for
byte-level models of the standard library (the default corpus).
"""
from __future__ import annotations

import ast
import random
from dataclasses import dataclass
from typing import Callable

from monoroute.errors import MonorouteError

NAMES = ["data", "value", "items", "name", "count", "result", "total", "key", "path", "line", "text",
         "node", "size", "index", "buf", "token", "row", "entry", "parts", "args", "obj", "item", "state",
         "prefix", "limit", "offset", "msg", "mode", "level", "field"]
WORDS = ["spam", "eggs", "hello", "utf-8", "ascii", "main", "error", "debug", "name", "file", "test",
         "value", "none", "yes", "data", "path", "word", "line", "read", "write"]
MODULES = ["os", "sys", "re", "json", "math", "time", "string", "random", "shutil", "struct", "types"]
FUNCS = ["len", "str", "int", "repr", "sorted", "list", "tuple", "min", "max"]


@dataclass(frozen=True)
class Example:
    prompt: str       # what the model reads
    completion: str   # the rest of the code; completion[0] is the byte the task asks for

    @property
    def answer(self) -> str:
        return self.completion[0]

    @property
    def text(self) -> str:
        return self.prompt + self.completion


@dataclass(frozen=True)
class Pair:
    a: Example  # its next byte is the task's `target`
    b: Example  # its next byte is the task's `alternative`


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str, str, str]]  # rng -> (prompt_a, completion_a, prompt_b, completion_b)
    preamble: bool = True  # prefix 0-3 random Python statements (a shared one per pair)
    python: bool = True  # the completed texts must parse (fact tasks are English)

    def pairs(self, n: int, seed: int = 0, max_prompt_bytes: int = 127) -> list[Pair]:
        """n seeded pairs whose prompts are at most `max_prompt_bytes` long (a preamble line is
        dropped until they fit) and whose completed texts parse."""
        rng = random.Random(f"{self.name}:{seed}")
        out: list[Pair] = []
        while len(out) < n:
            pa, ca, pb, cb = self.make(rng)
            lines = _preamble(rng) if self.preamble else []
            while lines and max(len(pa), len(pb)) + len("".join(lines)) > max_prompt_bytes:
                lines.pop()
            pre = "".join(lines)
            pair = Pair(Example(pre + pa, ca), Example(pre + pb, cb))
            if max(len(pair.a.prompt), len(pair.b.prompt)) > max_prompt_bytes:
                raise MonorouteError(f"task {self.name}: a prompt is longer than {max_prompt_bytes} bytes even without "
                                     f"its preamble; use a model with a longer context")
            check_pair(self.name, pair, self.python)
            out.append(pair)
        return out

    def splits(self, n: int, parts: int = 3, seed: int = 0, max_prompt_bytes: int = 127) -> list[list[Pair]]:
        """`parts` lists of n // parts pairs each, no prompt in two pairs (within or across lists): one to
        learn the masks on, one to choose K, one to report, so no reported number was selected on its data.
        A generator that cannot give that many distinct prompts is one clear error."""
        per = n // parts
        rng_seed = seed
        seen: set[str] = set()
        out: list[Pair] = []
        for attempt in range(64):
            for pair in self.pairs(4 * n, seed=rng_seed * 1000 + attempt, max_prompt_bytes=max_prompt_bytes):
                if pair.a.prompt in seen or pair.b.prompt in seen or pair.a.prompt == pair.b.prompt:
                    continue
                seen.update((pair.a.prompt, pair.b.prompt))
                out.append(pair)
                if len(out) == per * parts:
                    return [out[i * per:(i + 1) * per] for i in range(parts)]
        raise MonorouteError(f"task {self.name}: only {len(out)} pairs with distinct prompts could be drawn, "
                             f"{per * parts} needed; use fewer --pairs")


def check_pair(task: str, pair: Pair, python: bool = True) -> None:
    """The invariants every pair keeps (a generator bug, not the user's input, breaks them)."""
    if pair.a.answer == pair.b.answer:
        raise AssertionError(f"task {task}: both members of a pair answer {pair.a.answer!r}")
    for ex in (pair.a, pair.b):
        if not ex.text.isascii():
            raise AssertionError(f"task {task}: non-ASCII text {ex.text!r}")
        if not python:
            continue
        try:
            ast.parse(ex.text)
        except SyntaxError as exc:
            raise AssertionError(f"task {task}: completed text does not parse ({exc}): {ex.text!r}") from None


def _preamble(rng: random.Random) -> list[str]:
    """0-3 complete top-level statements, so that the task's code sits in varied surroundings."""
    pool = [
        lambda: f"import {rng.choice(MODULES)}\n",
        lambda: f"{rng.choice(NAMES)} = {rng.randint(0, 99)}\n",
        lambda: f"{rng.choice(NAMES)} = '{rng.choice(WORDS)}'\n",
        lambda: f"# {rng.choice(WORDS)} {rng.choice(WORDS)}\n",
        lambda: f"{rng.choice(NAMES)} = {rng.choice(FUNCS)}({rng.choice(NAMES)})\n",
        lambda: "\n",
    ]
    return [rng.choice(pool)() for _ in range(rng.randint(0, 3))]


def _two(rng: random.Random, pool=NAMES) -> tuple[str, str]:
    a, b = rng.sample(pool, 2)
    return a, b


# --- the generators: rng -> (prompt_a, completion_a, prompt_b, completion_b) ---------------------

def _quote(rng):
    v, w = rng.choice(NAMES), rng.choice(WORDS)
    return f"{v} = '{w}", "'\n", f'{v} = "{w}', '"\n'


def _bracket_depth(rng):
    v = rng.choice(NAMES)
    xs = ", ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 4)))
    return f"{v} = [[{xs}]", "]\n", f"{v} = [{xs}]", "\n"


def _dict_vs_list(rng):
    v, (k1, k2) = rng.choice(NAMES), _two(rng, WORDS)
    n1, n2 = rng.randint(0, 99), rng.randint(0, 99)
    return f"{v} = {{'{k1}': {n1}, '{k2}'", f": {n2}}}\n", f"{v} = ['{k1}', {n1}, '{k2}'", f", {n2}]\n"


def _for_vs_while(rng):
    v, seq = _two(rng)
    return f"for {v}", f" in {seq}:\n    pass\n", "while True", ":\n    break\n"


def _else_vs_elif(rng):
    v, u = _two(rng)
    w = rng.choice(NAMES)
    head = f"if {v}:\n    {w} = {rng.randint(0, 9)}\n"
    return head + "else", f":\n    {w} = 0\n", head + "elif", f" {u}:\n    {w} = 0\n"


def _lambda_vs_def(rng):
    f, x = _two(rng)
    return f"{f} = lambda {x}", f": {x}\n", f"def {f}", f"({x}):\n    return {x}\n"


def _compare_vs_assign(rng):
    v = rng.choice(NAMES)
    n = rng.randint(0, 99)
    return f"if {v} =", f"= {n}:\n    pass\n", f"{v} =", f" {n}\n"


def _set_vs_str(rng):
    v, x = _two(rng)
    w = rng.choice(WORDS)
    filler = f"for {x} in {rng.choice(NAMES)}:\n    "
    return (f"{v} = set()\n{filler}{v}", f".add({x})\n",
            f"{v} = ''\n{filler}{v}", f" += {x}\n")


def _with_as(rng):
    f, p = rng.choice(NAMES), rng.choice(WORDS)
    return f"with open('{p}')", f" as {f}:\n    pass\n", f"{f} = open('{p}')", "\n"


def _indent_after_block(rng):
    f, x = _two(rng)
    head = f"def {f}({x}):\n"
    if rng.random() < 0.5:
        a = head + f"    for {rng.choice(NAMES)} in {x}:\n"
    else:
        a = head + "    while True:\n"
    return a, "        pass\n", head + "    return True\n", "\n"


def _fstring_brace(rng):
    v, x = _two(rng)
    w = rng.choice(WORDS)
    return f'{v} = f"{w} {{{x}', '}"\n', f'{v} = f"{w} {{{x}}}', '"\n'


def _kwarg_default(rng):
    f, (a, b) = rng.choice(["run", "get", "open", "load", "parse", "call"]), _two(rng)
    return (f"def {f}(self, {a}=None, {b}", "=None):\n    pass\n",
            f"def {f}(self, {a}, {b}", "):\n    pass\n")


def _from_import(rng):
    m = rng.choice(MODULES)
    return f"from {m}", " import path\n", f"import {m}", "\n"


def _bracket_type(rng):
    v, (x, y) = rng.choice(NAMES), _two(rng)
    f = rng.choice(FUNCS[:6])
    return f"{v} = {f}({x}, {y}", ")\n", f"{v} = [{x}, {y}", "]\n"


def _keyword_vs_call(rng):
    v = rng.choice(NAMES)
    head = f"def {rng.choice(NAMES)}({v}):\n    "
    return head + "return", f" {v}\n", head + "print", f"({v})\n"


def _finally_vs_except(rng):
    v = rng.choice(NAMES)
    head = f"try:\n    {v} = {rng.choice(FUNCS)}({v})\n"
    return head + "finally", ":\n    pass\n", head + "except", " ValueError:\n    pass\n"


def _empty_container(rng):
    v = rng.choice(NAMES)
    return f"{v} = [", "]\n", f"{v} = {{", "}\n"


def _self_attr_vs_param(rng):
    f, a = _two(rng)
    head = f"class {f.title()}:\n    def {f}(self"
    return head + f", {a}):\n        self", f".{a} = {a}\n", head, f", {a}):\n        pass\n"


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("quote", "closing quote matches the opening one: ' vs \"", _quote),
    Task("bracket_depth", "after a nested list's first ], close the outer one: ] vs newline", _bracket_depth),
    Task("dict_vs_list", "the separator after the second item of a dict vs a list: ':' vs ','", _dict_vs_list),
    Task("for_vs_while", "after `for x` comes ' in'; after `while True` comes ':'", _for_vs_while),
    Task("else_vs_elif", "`else` is followed by ':', `elif` by ' '", _else_vs_elif),
    Task("lambda_vs_def", "`lambda x` is followed by ':', `def f` by '('", _lambda_vs_def),
    Task("compare_vs_assign", "`if x =` continues '=='; `x =` continues ' '", _compare_vs_assign),
    Task("set_vs_str", "a set variable gets `.add`, a string `+=` (long-range: the type is set lines above)", _set_vs_str),
    Task("with_as", "`with open(...)` continues ' as'; `f = open(...)` ends the line", _with_as),
    Task("indent_after_block", "after `for ...:`/`while True:` the body is indented; after `return True`, a newline",
         _indent_after_block),
    Task("fstring_brace", "inside an f-string field close '}'; after it close the string '\"'", _fstring_brace),
    Task("kwarg_default", "a parameter after a defaulted one needs '='; after plain ones the signature may end ')'",
         _kwarg_default),
    Task("from_import", "`from m` continues ' import'; `import m` ends the line", _from_import),
    Task("bracket_type", "close the bracket that is open: ')' vs ']'", _bracket_type),
    # four short-range contrasts that small byte-level models can already do
    Task("keyword_vs_call", "`return` is followed by ' ', `print` by '('", _keyword_vs_call),
    Task("finally_vs_except", "`finally` is followed by ':', `except` by ' '", _finally_vs_except),
    Task("empty_container", "an empty list closes ']', an empty dict '}'", _empty_container),
    Task("self_attr_vs_param", "`self` in a method body takes '.'; in the signature ','", _self_attr_vs_param),
]}


# --- fact recall (the synthetic-knowledge corpus, data/facts.py) ----------------------------------------

def fact_tasks(world) -> dict[str, Task]:
    """One task per attribute of a facts world: the same training-template sentence about two people with
    different values, up to the first byte where the values differ (years share "19", universities
    may share "Northfield "); the next byte is that byte of each one's own value. Only the name differs
    between the two prompts, so the model must recall the fact, not read it off the sentence. Prompts
    start with the document separator, as every biography does in training."""
    from os.path import commonprefix


    out = {}
    for a, attr in enumerate(world.attributes):
        def make(rng: random.Random, a=a, attr=attr):
            while True:
                p, q = rng.sample(range(world.n_people), 2)
                va, vb = world.value(p, a), world.value(q, a)
                if va != vb:
                    break
            shared = commonprefix([va, vb])
            t = rng.randrange(len(attr.templates))
            qa, qb = world.query(p, a, "train", template=t), world.query(q, a, "train", template=t)
            return ("\n\n" + qa.prefix + shared, va[len(shared):] + ".", "\n\n" + qb.prefix + shared,
                    vb[len(shared):] + ".")

        out[f"fact_{attr.name}"] = Task(f"fact_{attr.name}", f"recall {attr.name.replace('_', ' ')}: the first byte "
                                        f"of the person's own value", make, preamble=False, python=False)
    return out


def check_fact_world(world) -> None:
    """Fact tasks need two people with different values, for every attribute."""

    for a, attr in enumerate(world.attributes):
        if len({world.value(p, a) for p in range(world.n_people)}) < 2:
            raise MonorouteError(f"the facts world has no two people with different {attr.name}s; fact tasks need "
                                 f"more people")


def select_tasks(names: list[str] | None, world=None) -> list[Task]:
    """The named tasks (by default all of the run's kind: the Python tasks, or for a run trained on a
    facts corpus (`world`) its fact-recall tasks); an unknown name is one clear error."""
    available = dict(TASKS)
    if world is not None:
        check_fact_world(world)
        available.update(fact_tasks(world))
    if not names:
        return list(fact_tasks(world).values()) if world is not None else list(TASKS.values())
    unknown = [n for n in names if n not in available]
    if unknown:
        extra = "" if world is not None else " (fact_* tasks need a run trained on a facts corpus)"
        raise MonorouteError(f"unknown task {unknown[0]!r}; choose from {', '.join(available)}{extra}")
    return [available[n] for n in names]
