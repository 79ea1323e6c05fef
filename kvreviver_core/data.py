"""Summarization data: XSum and CNN/DailyMail through HF ``datasets``, a local JSONL file, or builtin prose.

* ``xsum`` / ``cnn_dailymail``: the test splits that HELM's summarization scenarios use (document -> summary,
  article -> highlights), with HELM's instruction after the article ("Summarize the above article in 1 sentence."
  for XSum, "... in 3 sentences." for CNN/DailyMail). Online, or from the local HF cache.
* ``FILE.jsonl``: one JSON object per line; the document and reference fields are named by the caller. A
  malformed line is reported as ``FILE:LINE: what is wrong``.
* ``builtin``: the held-out part of CPython's ``pydoc_data.topics`` (the sections offline calibration never
  reads, see :func:`kvreviver_core.calibration.builtin_prose`), cut at paragraph boundaries into passages that
  fill the context. It has no reference summaries: it is scored by fidelity to the full cache only.

``--limit N`` keeps the first N examples of a shuffle seeded by ``--seed``, so a larger limit with the same seed
keeps the smaller run's examples. ``--max-context`` caps the whole prompt (chat template and instruction
included) by truncating the document, never the instruction.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from kvreviver_core.generation import format_prompt
from kvreviver_core.models import is_chat_model

BUILTIN = "builtin"
MIN_DOCUMENT_TOKENS = 16  # a context cap that leaves less than this for the document is a usage error


@dataclass(frozen=True)
class HubDataset:
    """A summarization dataset on the HF hub: where it is, which split and fields, and the instruction."""

    path: str
    config: str | None
    split: str
    input_field: str
    reference_field: str
    instruction: str
    revision: str | None = None


HUB_DATASETS: dict[str, HubDataset] = {
    # The hub repo still carries a loading script, which datasets >= 4 refuses; its parquet export is the same data.
    "xsum": HubDataset("EdinburghNLP/xsum", None, "test", "document", "summary",
                       "Summarize the above article in 1 sentence.", revision="refs/convert/parquet"),
    "cnn_dailymail": HubDataset("abisee/cnn_dailymail", "3.0.0", "test", "article", "highlights",
                                "Summarize the above article in 3 sentences."),
}
FILE_INSTRUCTION = "Summarize the above article in a few sentences."
BUILTIN_INSTRUCTION = "Summarize the above text in 2 sentences."


@dataclass(frozen=True)
class Example:
    """One document; ``reference`` is None where the dataset has no reference summary."""

    id: str
    document: str
    reference: str | None


@dataclass(frozen=True)
class Prompt:
    """An example ready for ``generate_batch``: ``text`` is formatted (chat template applied) and fits the cap."""

    id: str
    text: str
    reference: str | None
    prompt_tokens: int
    truncated: bool


@dataclass(frozen=True)
class SummarizationSet:
    name: str
    examples: list[Example]
    instruction: str
    label: str  # what the prompt calls the document ("Article", "Text")

    @property
    def has_references(self) -> bool:
        return all(example.reference is not None for example in self.examples)


def dataset_names() -> list[str]:
    return [BUILTIN, *HUB_DATASETS]


def load_examples(
    name: str,
    tokenizer,
    max_context: int,
    limit: int | None = None,
    seed: int = 0,
    input_field: str = "document",
    reference_field: str = "summary",
) -> SummarizationSet:
    """Load ``name`` (builtin, xsum, cnn_dailymail or a ``.jsonl`` path) and keep ``limit`` examples."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if name == BUILTIN:
        passages = builtin_passages(tokenizer, document_token_room(tokenizer, BUILTIN_INSTRUCTION, "Text", max_context))
        return SummarizationSet(name, _take(passages, limit, seed), BUILTIN_INSTRUCTION, "Text")
    if name in HUB_DATASETS:
        return SummarizationSet(name, load_hub(HUB_DATASETS[name], name, limit, seed), HUB_DATASETS[name].instruction,
                                "Article")
    if name.endswith(".jsonl") or Path(name).exists():
        examples = read_jsonl(Path(name), input_field, reference_field)
        return SummarizationSet(name, _take(examples, limit, seed), FILE_INSTRUCTION, "Article")
    raise ValueError(f"unknown dataset {name!r}; use {', '.join(dataset_names())} or a FILE.jsonl")


def _take(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:limit]]


def load_hub(spec: HubDataset, name: str, limit: int | None, seed: int) -> list[Example]:
    """The dataset's test split through HF ``datasets`` (online or from the HF cache)."""
    try:
        import datasets

        table = datasets.load_dataset(spec.path, spec.config, split=spec.split, revision=spec.revision)
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, RuntimeError, ... offline
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot load {name} ({spec.path}, {spec.split} split) from the HF hub or the local HF cache: {reason}; "
            f"where there is no network use --dataset builtin or --dataset FILE.jsonl"
        ) from None
    order = list(range(len(table)))
    random.Random(seed).shuffle(order)
    rows = table.select(order[:limit] if limit is not None else order)
    return [
        Example(str(row.get("id", index)), row[spec.input_field], row[spec.reference_field])
        for index, row in zip(order, rows)
    ]


def read_jsonl(path: Path, input_field: str, reference_field: str) -> list[Example]:
    """Every example of ``path``. References are all present or all absent; blank lines are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"dataset file {path} is not UTF-8 text (byte {exc.start})") from None
    examples: list[Example] = []
    with_reference: bool | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        document = _text_field(row, input_field, where, "--input-field")
        has_reference = reference_field in row
        if with_reference is None:
            with_reference = has_reference
        elif has_reference != with_reference:
            state = "has" if has_reference else "lacks"
            raise ValueError(f"{where}: {state} the reference field {reference_field!r}, unlike the lines before it")
        reference = _text_field(row, reference_field, where, "--reference-field") if has_reference else None
        examples.append(Example(str(row.get("id", f"line-{number}")), document, reference))
    if not examples:
        raise ValueError(f"dataset file {path} has no examples")
    return examples


def _text_field(row: dict, field: str, where: str, flag: str) -> str:
    if field not in row:
        raise ValueError(f"{where}: no field {field!r} (the line has: {', '.join(row) or 'nothing'}); choose with {flag}")
    value = row[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def builtin_passages(tokenizer, passage_tokens: int) -> list[Example]:
    """The held-out builtin prose cut at paragraph boundaries into passages of at most ``passage_tokens`` tokens.

    Paragraphs that also appear verbatim in the calibration part are left out, so calibrated methods are never
    scored on text they were fitted on. A passage is consecutive paragraphs; a single paragraph longer than the room is kept whole here and truncated
    by :func:`build_prompts`.
    """
    from kvreviver_core.calibration import builtin_prose

    calibration_text = builtin_prose("calibration")
    passages: list[Example] = []
    current: list[str] = []
    used = 0
    for paragraph in builtin_prose("heldout").split("\n\n"):
        # pydoc sections quote each other: a held-out section's paragraph can also sit in a calibration section.
        if not paragraph.strip() or paragraph in calibration_text:
            continue
        size = count_tokens(tokenizer, paragraph)
        if current and used + size > passage_tokens:
            passages.append(Example(f"pydoc-{len(passages)}", "\n\n".join(current), None))
            current, used = [], 0
        current.append(paragraph)
        used += size
    if current and (used >= passage_tokens // 2 or not passages):  # a short tail would be a poor document
        passages.append(Example(f"pydoc-{len(passages)}", "\n\n".join(current), None))
    return passages


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _user_text(label: str, document: str, instruction: str) -> str:
    return f"{label}: {document}\n\n{instruction}"


def _prompt_length(tokenizer, text: str) -> int:
    # Counted as generate_batch encodes it: chat models' templates already hold their special tokens.
    return len(tokenizer(text, add_special_tokens=not is_chat_model(tokenizer))["input_ids"])


def document_token_room(tokenizer, instruction: str, label: str, max_context: int) -> int:
    """Tokens left for the document once the template, label and instruction of a prompt are counted."""
    overhead = _prompt_length(tokenizer, format_prompt(tokenizer, _user_text(label, "", instruction)))
    room = max_context - overhead
    if room < MIN_DOCUMENT_TOKENS:
        raise ValueError(
            f"--max-context {max_context} leaves {room} tokens for the document (the instruction and chat template "
            f"take {overhead}); use at least {overhead + MIN_DOCUMENT_TOKENS}"
        )
    return room


def build_prompts(dataset: SummarizationSet, tokenizer, max_context: int) -> list[Prompt]:
    """Format every example as a prompt of at most ``max_context`` tokens, truncating the document's end."""
    room = document_token_room(tokenizer, dataset.instruction, dataset.label, max_context)
    prompts = []
    for example in dataset.examples:
        document, truncated = truncate_tokens(tokenizer, example.document, room)
        text = format_prompt(tokenizer, _user_text(dataset.label, document, dataset.instruction))
        prompts.append(Prompt(example.id, text, example.reference, _prompt_length(tokenizer, text), truncated))
    return prompts


def truncate_tokens(tokenizer, text: str, max_tokens: int) -> tuple[str, bool]:
    """The longest prefix of ``text`` of at most ``max_tokens`` tokens, cut between tokens; and whether it was cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    # Cut the original text at a token boundary (re-decoding could alter whitespace or normalise characters).
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).get("offset_mapping")
    cut = offsets[max_tokens][0] if offsets else len(tokenizer.decode(ids[:max_tokens]))
    prefix = text[:cut].rstrip()
    # Tokens can merge differently at the new end; trim a few characters more until the prefix fits.
    while count_tokens(tokenizer, prefix) > max_tokens:
        prefix = prefix[: max(0, len(prefix) - 8)].rstrip()
    return prefix, True
