"""Answer metrics: exact match, contains-match, ROUGE-L F1, perplexity; and which way each is better."""

from __future__ import annotations

import math


def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


def exact_match(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def contains_match(answer: str, reference: str) -> bool:
    """The reference appears in the answer (after normalisation): right, with extra words around it."""
    return normalise(reference) in normalise(answer)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 on normalised whitespace tokens: the longest common subsequence against both lengths."""
    a, r = normalise(answer).split(), normalise(reference).split()
    common = _lcs_length(a, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    if len(b) > len(a):
        a, b = b, a  # the row is the shorter list: O(len(b)) memory
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def perplexity(loss: float) -> float | None:
    """exp(loss), or None where it overflows a float (JSON has no infinity)."""
    return math.exp(loss) if loss < 709 else None



# What the table and the differences to the base show, and whether a higher value is better.
METRICS = {"loss": False, "perplexity": False, "exact_match": True, "contains": True, "rouge_l": True,
           "tokens_per_second": True}
