"""Multiple-choice scoring of facts: the log-probability of every value of the attribute after the prompt.

A query's prompt is the document separator, then the sentence up to the value ("Ada Lovelace was
born in the city of "), as a biography's first sentence reads in training. Each candidate is the
value followed by the sentence's "." (so a value that is a prefix of another is not favoured);
its score is the sum of the log-probabilities of those tokens. The model *recalls* the fact when
the true value has the highest score among all of the attribute's values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from monoroute.data.facts import FactsWorld, Query

BATCH_SEQUENCES = 256  # sequences per forward pass


@dataclass
class Encoded:
    """One query as token ids: the prompt and every candidate (value + '.') of its attribute."""

    query: Query
    prompt: list[int]
    candidates: list[list[int]]
    true: int  # index of the true value among the candidates


def encode_query(tokenizer, query: Query) -> Encoded:
    """At byte level the prompt ends with the space before the value. A BPE (GPT-2 style) joins that space
    to the next word (" Paris"), so there the space moves into every candidate: prompt + candidate is
    then tokenised as the sentence is in training, and the common space changes no comparison."""
    prefix, lead = query.prefix, ""
    if getattr(tokenizer, "kind", "byte") != "byte" and prefix.endswith(" "):
        prefix, lead = prefix[:-1], " "
    prompt = list(tokenizer.boundary_ids()) + tokenizer.encode(prefix)
    values = query.values
    candidates = [tokenizer.encode(lead + v + ".") for v in values]
    return Encoded(query, prompt, candidates, values.index(query.value))


def sequences(enc: Encoded) -> list[tuple[list[int], int]]:
    """(token ids, index of the first scored token) for each candidate."""
    return [(enc.prompt + cand, len(enc.prompt)) for cand in enc.candidates]


def score_sequences(forward, seqs: list[tuple[list[int], int]], device, dtype=torch.float32,
                    batch: int = BATCH_SEQUENCES) -> Tensor:
    """(n,) sum of log p(token) over each sequence's tokens from its start index; forward(idx) -> logits."""
    out = []
    for lo in range(0, len(seqs), batch):
        chunk = seqs[lo:lo + batch]
        width = max(len(s) for s, _ in chunk)
        idx = torch.zeros(len(chunk), width, dtype=torch.long)
        scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
        for row, (ids, start) in enumerate(chunk):
            idx[row, :len(ids)] = torch.tensor(ids)
            scored[row, start - 1:len(ids) - 1] = True  # logits at t predict token t + 1
        idx = idx.to(device)
        logp = forward(idx[:, :-1]).to(dtype).log_softmax(-1)  # (b, width - 1, V)
        tok = logp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, width - 1)
        out.append((tok * scored.to(device)).sum(-1))
    return torch.cat(out)


def score_queries(forward, encoded: list[Encoded], device, dtype=torch.float32) -> list[Tensor]:
    """Per query, (V,) candidate scores, every query's candidates batched together."""
    seqs = [s for enc in encoded for s in sequences(enc)]
    flat = score_sequences(forward, seqs, device, dtype)
    out, at = [], 0
    for enc in encoded:
        out.append(flat[at:at + len(enc.candidates)])
        at += len(enc.candidates)
    return out


def correct(scores: Tensor, true: int) -> bool:
    """The true value strictly beats every other (a tie is not recall)."""
    others = torch.cat([scores[:true], scores[true + 1:]])
    return bool(scores[true] > others.max())


def all_queries(world: FactsWorld, family: str, draw: int = 0) -> list[Query]:
    return [world.query(p, a, family, draw) for p in range(world.n_people) for a in range(len(world.attributes))]
