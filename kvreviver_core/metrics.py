"""Scores: ROUGE against references (rouge-score), fidelity to the full cache's output, and needle recall.

Every score is a fraction in [0, 1]; tables multiply by 100 as the paper prints them. ROUGE uses rouge-score
with the Porter stemmer, as HELM's summarization metrics do.

Two kinds of score must never be confused:

* *reference* ROUGE (:func:`rouge_f`): the output against a human summary;
* *fidelity* (:func:`fidelity`): a compressed method's output against the full cache's output on the same prompt,
  i.e. how little the compression changed what the model says. It is the only score where a dataset has no
  reference summaries (``--dataset builtin``), and its names always say "vs full".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
ROUGE_LABELS: dict[str, str] = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}


@functools.lru_cache(maxsize=None)
def _scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def rouge_f(reference: str, output: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of ``output`` against ``reference``, keyed ``rouge1``, ``rouge2``, ``rougeL``."""
    scores = _scorer(ROUGE_TYPES).score(reference, output)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def rouge_l_f(reference: str, output: str) -> float:
    """ROUGE-L F of ``output`` against ``reference``. Two texts with no words at all count as identical (1.0)."""
    if _no_words(reference) and _no_words(output):
        return 1.0
    return float(_scorer(("rougeL",)).score(reference, output)["rougeL"].fmeasure)


def rouge1_recall(answer: str, output: str) -> float:
    """Share of ``answer``'s unigrams (rouge-score tokens, stemmed) found in ``output``: needle retrieval.

    It is recall, not F: a correct answer wrapped in a full sentence ("The passkey is 60494.") still scores 1.0.
    """
    if _no_words(answer):
        raise ValueError("rouge1_recall needs an answer with at least one word")
    return float(_scorer(("rouge1",)).score(answer, output)["rouge1"].recall)


def _no_words(text: str) -> bool:
    # rouge-score keeps only [a-z0-9] runs; text without any scores 0 against everything, itself included.
    return not any(ch.isalnum() for ch in text)


@dataclass(frozen=True)
class Fidelity:
    """How a compressed run's output for one prompt compares with the full cache's.

    Attributes:
        rouge_l_vs_full: ROUGE-L F between the two generated texts.
        first_token_match: whether the first generated token is the same (the prefill's decision, before any
            generated token can differ).
    """

    rouge_l_vs_full: float
    first_token_match: bool


def fidelity(output_text: str, output_ids: list[int], full_text: str, full_ids: list[int]) -> Fidelity:
    """Compare one method's generation with the full cache's generation of the same prompt."""
    first_match = (output_ids[:1] == full_ids[:1])
    return Fidelity(rouge_l_vs_full=rouge_l_f(full_text, output_text), first_token_match=bool(first_match))
