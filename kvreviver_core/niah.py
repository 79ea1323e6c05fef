"""Needle in a haystack (gkamradt's NIAH, the paper's Figure 5): documents, needles, scoring and the grid runner.

A grid point is (context length in tokens, needle depth in [0, 1]). Its document is the haystack cut to the length
with the needle sentence(s) inserted at the depth, on a sentence boundary: the insertion point is the last sentence
end at or before ``depth`` of the way through the cut haystack (gkamradt walks back to the previous period the same
way). Depth 1 puts the needle at the very end. The document's token count is the requested length (the haystack cut
is adjusted until the whole document, needle included, tokenizes to it).

The default needle is a passkey fact drawn per grid point from the seed, so no model can pass by memorising one
string; every method sees the same needle at a grid point. ``questions_per_context = K`` inserts K such facts
together and asks one question for each.

Two modes (see :mod:`kvreviver_core.generation`): the question after the compressed context (default; the paper's
Contextual Amnesia case), or the question inside the prompt.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kvreviver_core.budget import Budget
from kvreviver_core.generation import Generation, format_prompt, generate_after_context, generate_batch, split_prompts
from kvreviver_core.metrics import rouge1_recall
from kvreviver_core.results import ResultStore
from kvreviver_core.specs import method_spec

PYDOC_HAYSTACK = "pydoc_data.topics"
# Where a sentence ends: terminal punctuation, closing quotes or brackets, then whitespace.
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
# Subjects that tell K passkeys apart; each needle and question names its own.
SUBJECTS = (
    "red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white",
    "brown", "grey", "violet", "crimson", "amber", "ivory", "teal", "scarlet", "indigo", "copper",
)
SEPARATOR = "\n\n"
KEY_FIELDS = ("model", "haystack", "method", "budget", "length", "depth", "mode", "seed", "question_index",
              "needle", "question", "answer")


@dataclass(frozen=True)
class Needle:
    """A fact to hide (``text``), the question that asks for it, and the expected ``answer``."""

    text: str
    question: str
    answer: str

    def __post_init__(self) -> None:
        for name in ("text", "question", "answer"):
            if not getattr(self, name).strip():
                raise ValueError(f"the needle's {name} is empty")
        if not any(ch.isalnum() for ch in self.answer):
            raise ValueError("the needle's answer needs at least one letter or digit to be scored")


def passkey_needle(rng: random.Random, subject: str) -> Needle:
    """A random 5-digit passkey for ``subject``, said twice as in the passkey-retrieval task."""
    key = str(rng.randint(10000, 99999))
    return Needle(
        text=f"The passkey for the {subject} door is {key}. Remember it: {key} is the passkey for the {subject} door.",
        question=f"What is the passkey for the {subject} door? Answer with the number.",
        answer=key,
    )


def grid_needles(seed: int, length: int, depth: float, count: int) -> list[Needle]:
    """The ``count`` default needles of one grid point: the same for every method, different between points."""
    if not 1 <= count <= len(SUBJECTS):
        raise ValueError(f"questions per context must be between 1 and {len(SUBJECTS)}, got {count}")
    rng = random.Random(f"niah/{seed}/{length}/{depth:.6f}")
    return [passkey_needle(rng, subject) for subject in rng.sample(SUBJECTS, count)]


def needle_score(answer: str, output: str) -> float:
    """1 if ``answer`` appears in ``output`` (case-insensitive), else the ROUGE-1 recall of ``answer``, in [0, 1]."""
    if answer.strip().lower() in output.lower():
        return 1.0
    return rouge1_recall(answer, output)


# -- haystack ----------------------------------------------------------------------------------------------------------
def load_haystack(path: Path | None = None) -> str:
    """The haystack text: ``pydoc_data.topics`` (ships with Python), a .txt file, or a folder of .txt files."""
    if path is None:
        from pydoc_data.topics import topics

        return SEPARATOR.join(topics[name] for name in sorted(topics))
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"haystack folder {path} has no .txt files")
        text = SEPARATOR.join(f.read_text(errors="replace") for f in files)
    elif path.is_file():
        text = path.read_text(errors="replace")
    else:
        raise ValueError(f"haystack {path} does not exist")
    if len(SENTENCE_END.findall(text)) < 2:
        raise ValueError(f"haystack {path} has no sentences to insert a needle between")
    return text


class Haystack:
    """The haystack text tokenized once, with each token's character span (needs a fast tokenizer)."""

    def __init__(self, text: str, tokenizer) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("niah needs a fast tokenizer (it cuts the haystack by token offsets)")
        self.text = text
        self.tokenizer = tokenizer
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.token_ends = [end for _, end in encoded["offset_mapping"]]
        self.token_starts = [start for start, _ in encoded["offset_mapping"]]
        self.sentence_ends = [m.end() for m in SENTENCE_END.finditer(text)]

    def __len__(self) -> int:
        return len(self.token_ends)

    def repeated_to(self, tokens: int) -> "Haystack":
        """This haystack, repeated as often as needed to hold ``tokens`` tokens (gkamradt repeats essays too)."""
        if len(self) > tokens:
            return self
        copies = math.ceil((tokens + 1) / max(1, len(self))) + 1
        return Haystack(SEPARATOR.join([self.text] * copies), self.tokenizer)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Document:
    """One grid point's context. ``needle_char`` is where the needle block starts in ``text``."""

    text: str
    tokens: int
    needle_char: int
    needle_block: str
    body_chars: int
    target_char: int

    @property
    def needle_depth(self) -> float:
        """Where the needle starts, as a fraction of the haystack characters around it."""
        return self.needle_char / max(1, self.body_chars)


def build_document(haystack: Haystack, length: int, depth: float, needles: list[Needle]) -> Document:
    """Cut ``haystack`` so that, with the needles inserted at ``depth``, the document has ``length`` tokens.

    The needle block goes at the last sentence end at or before ``depth`` of the way through the cut haystack
    (the very end for depth 1). The cut is corrected until the document tokenizes to ``length`` tokens, or as
    close as token merges at the seams allow.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    block = " ".join(n.text for n in needles)
    block_tokens = haystack.count(" " + block)
    if length < block_tokens + 16:
        raise ValueError(f"length {length} is too short for a {block_tokens}-token needle")
    haystack = haystack.repeated_to(length + 64)
    body_tokens = length - block_tokens
    best: Document | None = None
    for _ in range(6):
        document = _insert(haystack, body_tokens, depth, block)
        if best is None or abs(document.tokens - length) < abs(best.tokens - length):
            best = document
        if document.tokens == length:
            break
        body_tokens += length - document.tokens
    return best


def _insert(haystack: Haystack, body_tokens: int, depth: float, block: str) -> Document:
    body_end = haystack.token_ends[body_tokens - 1]
    body = haystack.text[:body_end]
    if depth >= 1.0:
        target = len(body)
        text = body + " " + block
        needle_char = len(body) + 1
    else:
        target = haystack.token_starts[min(body_tokens - 1, int(round(depth * body_tokens)))]
        ends = haystack.sentence_ends
        i = bisect.bisect_right(ends, target) - 1
        position = ends[i] if i >= 0 and ends[i] <= body_end else 0
        if position == 0:
            text, needle_char = block + " " + body, 0
        else:
            text, needle_char = body[:position] + " " + block + body[position:], position + 1
    return Document(text, haystack.count(text), needle_char, block, len(body), target)


# -- the grid ----------------------------------------------------------------------------------------------------------
@dataclass
class NiahGrid:
    """What one ``kvreviver niah`` run covers.

    Args:
        methods: method names (see ``list_methods``); budget: fraction of the full cache's memory for the context.
        lengths: document lengths in tokens; depths: needle depths in [0, 1].
        needle: a fixed needle for every point, or None for random passkeys drawn from ``seed``.
        questions_per_context: K needles and K questions per document (one compressed context reused K times in
            question-after-context mode).
        question_after_context: compress the document alone, then ask (default); else the question is in the prompt.
    Methods are specs ``name`` or ``name:key=value:key=value`` (e.g. ``kvreviver:estimator=mean``,
    ``kvreviver:split=0.2/0.4/0.4``): the method's options or Budget fields for ``make_cache``; the whole spec labels
    the method's rows, table line and heatmap.
    """

    methods: list[str]
    budget: float
    lengths: list[int]
    depths: list[float]
    seed: int = 0
    needle: Needle | None = None
    questions_per_context: int = 1
    question_after_context: bool = True
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("niah needs at least one method")
        for spec in self.methods:
            method_spec(spec)
        Budget.coerce(self.budget)
        if not self.lengths or any(n < 32 for n in self.lengths):
            raise ValueError(f"lengths must be token counts >= 32, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        if self.needle is not None and self.questions_per_context != 1:
            raise ValueError("a custom needle is one fact: --questions-per-context must be 1 with --needle")
        if not 1 <= self.questions_per_context <= len(SUBJECTS):  # one passkey subject per question
            raise ValueError(f"questions per context must be between 1 and {len(SUBJECTS)}, "
                             f"got {self.questions_per_context}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def mode(self) -> str:
        return "after-context" if self.question_after_context else "in-prompt"

    def points(self) -> Iterator[tuple[int, float]]:
        for length in self.lengths:
            for depth in self.depths:
                yield length, depth

    def needles(self, length: int, depth: float) -> list[Needle]:
        if self.needle is not None:
            return [self.needle]
        return grid_needles(self.seed, length, depth, self.questions_per_context)


def run_niah(
    model,
    tokenizer,
    grid: NiahGrid,
    haystack_text: str,
    store: ResultStore,
    model_name: str,
    haystack_name: str,
    on_step: Callable[[str, int, float, bool], None] | None = None,
    points: list[tuple[int, float]] | None = None,
) -> list[dict]:
    """Run every (length, depth, method) of ``grid`` not already in ``store``; return this grid's rows.

    ``on_step(method, length, depth, skipped)`` is called after each point (for a progress bar). A point's rows
    (one per question) are appended together once all its questions are answered, so a kill loses at most the
    point in progress. ``points``: only these (length, depth) points of the grid (one rank's share); all if None.
    """
    haystack: Haystack | None = None  # tokenized when first needed: a grid found stored needs none
    done = store.done_keys()
    rows: list[dict] = []
    for length, depth in grid.points() if points is None else points:
        needles = grid.needles(length, depth)
        document: Document | None = None
        for method in grid.methods:
            keys = [_row_key(grid, model_name, haystack_name, method, length, depth, i, n)
                    for i, n in enumerate(needles)]
            if all(store.key(k) in done for k in keys):
                rows.extend(_stored(store, keys))
                if on_step:
                    on_step(method, length, depth, True)
                continue
            if document is None:
                if haystack is None:
                    haystack = Haystack(haystack_text, tokenizer).repeated_to(max(grid.lengths) + 64)
                document = build_document(haystack, length, depth, needles)
            outputs = answer_questions(model, tokenizer, grid, method, document, needles)
            for key, needle, output in zip(keys, needles, outputs):
                row = {**key, "output": output.text, "score": needle_score(needle.answer, output.text),
                       "context_tokens": document.tokens, "prompt_tokens": output.prompt_tokens,
                       "needle_depth": round(document.needle_depth, 4),
                       "memory_ratio": output.memory_bytes / output.full_bytes if output.full_bytes else 1.0,
                       "seconds": round(output.seconds, 3)}
                store.append(row)
                rows.append(row)
            done = store.done_keys()
            if on_step:
                on_step(method, length, depth, False)
    return rows


def answer_questions(model, tokenizer, grid: NiahGrid, method: str, document: Document,
                     needles: list[Needle]) -> list[Generation]:
    """One generation per needle's question, in the grid's mode, with a fresh ``method`` cache."""
    questions = [n.question for n in needles]
    name, options = method_spec(method)
    if grid.question_after_context:
        prompts = split_prompts(tokenizer, document.text, questions, SEPARATOR)
        return generate_after_context(model, tokenizer, prompts, name, grid.budget, grid.max_new_tokens, **options)
    prompts = [format_prompt(tokenizer, document.text + SEPARATOR + q) for q in questions]
    return generate_batch(model, tokenizer, prompts, name, grid.budget, grid.max_new_tokens, **options)


def split_spec(method: str, split: tuple[float, float, float]) -> str:
    """The spec of ``method`` at a Vague/Candidate/Recent split, as :func:`method_spec` reads it back."""
    return f"{method}:split={'/'.join(f'{s:g}' for s in split)}"


def _row_key(grid: NiahGrid, model_name: str, haystack_name: str, method: str, length: int, depth: float,
             index: int, needle: Needle) -> dict:
    return {"model": model_name, "haystack": haystack_name, "method": method, "budget": grid.budget,
            "length": length, "depth": depth, "mode": grid.mode, "seed": grid.seed, "question_index": index,
            "needle": needle.text, "question": needle.question, "answer": needle.answer}


def _stored(store: ResultStore, keys: list[dict]) -> list[dict]:
    wanted = {store.key(k) for k in keys}
    latest = {store.key(row): row for row in store.rows if store.key(row) in wanted}
    return [latest[store.key(k)] for k in keys]


def mean_scores(rows: list[dict], method: str, depths: list[float], lengths: list[int]) -> list[list[float]]:
    """``(len(depths), len(lengths))`` mean score of ``method`` per cell (NaN where no row); means over questions."""
    cells: dict[tuple[float, int], list[float]] = {}
    for row in rows:
        if row["method"] == method:
            cells.setdefault((float(row["depth"]), int(row["length"])), []).append(float(row["score"]))
    return [[_mean(cells.get((float(d), int(n)), [])) for n in lengths] for d in depths]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
