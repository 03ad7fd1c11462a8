"""MedQuAD XML -> clean, deduplicated QA records -> leakage-free train/valid/test splits.

Stage 1 of the data path (stage 2, tokenising and writing ``.bin/.idx``, is :mod:`.indexed`).
MedQuAD's quirks: three XML layouts, answer-less folders, qids that
repeat across folders and files, whitespace junk, templated boilerplate and duplicate pairs.

* Every layout is parsed: ``<Document>`` (11,269 files), ``<DiseaseFile>`` (1 CDC file) and the
  lower-case ``<doc>`` (4 NINDS files). A record is keyed by (folder, file, qid), the only unique
  key.
* Empty answers are dropped and counted per folder; whitespace is collapsed (NBSP included).
* Exact duplicate (question, answer) pairs are dropped, keeping the first by record id.
* Optional cleaners (``CLEANERS``) strip documented boilerplate; all are off by default so that
  the data matches what other MedQuAD users train on.
* Splits: pairs that share a normalised question or a normalised answer are connected; each
  connected group goes to one split, chosen by a seeded hash, so no question or answer text leaks
  from train into valid/test.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_yuyuan.errors import UserError


class MedQuADError(UserError):
    """Bad input; the message names the file and what to do."""


@dataclass(frozen=True)
class QARecord:
    """One answered question."""

    id: str
    """Unique key ``{folder}/{file stem}/{qid}``."""
    question: str
    answer: str
    qtype: str
    """MedQuAD question type (information, symptoms, treatment, ...)."""
    source: str
    """Collection name from the XML (CancerGov, GARD, GHR, ...)."""
    focus: str
    """The question's focus entity (disease, drug, ...)."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ParseStats:
    """Counts for the preprocessing report."""

    files: Counter = field(default_factory=Counter)
    pairs: Counter = field(default_factory=Counter)
    empty_answers: Counter = field(default_factory=Counter)
    empty_questions: Counter = field(default_factory=Counter)

    def merge(self, other: ParseStats) -> None:
        for name in ("files", "pairs", "empty_answers", "empty_questions"):
            getattr(self, name).update(getattr(other, name))


def collapse(text: str | None) -> str:
    """Collapse all whitespace runs (newlines, tabs, NBSP) to single spaces."""
    return " ".join((text or "").split())


# --- XML layouts ------------------------------------------------------------------------------
# root tag -> (source attribute, focus path, pair path, question tag, answer tag)
_LAYOUTS = {
    "Document": ("source", "Focus", "QAPairs/QAPair", "Question", "Answer"),
    "DiseaseFile": ("source", "Focus", "QAPairs/QAPair", "Question", "Answer"),
    "doc": ("corpus", "doctitle-focus", "qaPairs/pair", "question", "answer"),
}


def read_xml(path: Path) -> ET.Element:
    """Parse one file strictly as UTF-8 XML, with errors that name the file."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MedQuADError(
            f"{path}: not valid UTF-8 at byte {exc.start} "
            f"({data[max(0, exc.start - 20) : exc.start + 20]!r}); MedQuAD files are "
            f"UTF-8: re-download or fix the file"
        ) from exc
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise MedQuADError(f"{path}: malformed XML ({exc}); re-download or fix the file") from exc


def parse_file(path: Path) -> tuple[list[QARecord], ParseStats]:
    """All answered pairs in one MedQuAD XML file."""
    root = read_xml(path)
    if root.tag not in _LAYOUTS:
        raise MedQuADError(
            f"{path}: unknown root element <{root.tag}>; expected one of "
            f"{', '.join(f'<{t}>' for t in _LAYOUTS)}"
        )
    source_attr, focus_path, pair_path, q_tag, a_tag = _LAYOUTS[root.tag]
    folder = path.parent.name
    stats = ParseStats()
    stats.files[folder] += 1
    source = root.get(source_attr, folder)
    focus = collapse(root.findtext(focus_path))
    records = []
    for pair in root.findall(pair_path):
        q_el = pair.find(q_tag)
        stats.pairs[folder] += 1
        question = collapse(q_el.text if q_el is not None else "")
        answer = collapse(pair.findtext(a_tag))
        if not question:
            stats.empty_questions[folder] += 1
            continue
        if not answer:
            stats.empty_answers[folder] += 1
            continue
        qid = q_el.get("qid") or f"{path.stem}-{pair.get('pid')}"
        records.append(
            QARecord(
                id=f"{folder}/{path.stem}/{qid}",
                question=question,
                answer=answer,
                qtype=q_el.get("qtype", ""),
                source=source,
                focus=focus,
            )
        )
    return records, stats


def find_xml_files(root: Path) -> list[Path]:
    """Every ``*.xml`` under ``root`` (one folder per collection), sorted for determinism."""
    root = Path(root)
    if not root.is_dir():
        raise MedQuADError(
            f"--input {root}: "
            f"{'is a file, not a directory' if root.exists() else 'no such directory'}"
            f"; point it at the MedQuAD folder holding 1_CancerGov_QA/, 2_GARD_QA/, ..."
        )
    files = sorted(root.rglob("*.xml"))
    if not files:
        raise MedQuADError(f"--input {root}: no .xml files found under it")
    return files


def parse_files(paths: Sequence[Path]) -> tuple[list[QARecord], ParseStats]:
    """Parse several files; records in file order."""
    records, stats = [], ParseStats()
    for path in paths:
        recs, st = parse_file(path)
        records.extend(recs)
        stats.merge(st)
    return records, stats


def parse_medquad(root: Path) -> tuple[list[QARecord], ParseStats]:
    """Parse every file under ``root`` (one process); records are sorted by id."""
    records, stats = parse_files(find_xml_files(root))
    records.sort(key=lambda r: r.id)
    return records, stats


# --- optional cleaners ------------------------------------------------------------------------
_HPO_NOTE = re.compile(
    r"\s*The Human Phenotype Ontology \(HPO\) has collected information on how "
    r"often a sign or symptom occurs in a condition\..*$"
)
_VIDEO_NOTE = re.compile(r"\s*\(Watch the video to learn more[^()]*(\([^()]*\)[^()]*)*\)")
_HEADING_QUESTION = re.compile(
    r"^((?:What|How|Is|Are|Can|Who|Do|Does|When|Why|Which)\b[^?]{3,200}\?)"
    r"\s+(?=\S)"
)


def drop_key_points(answer: str) -> str:
    """CancerGov: drop the 'Key Points - a - b - c' summary, repeated verbatim as headings below."""
    if not answer.startswith("Key Points - "):
        return answer
    body = answer[len("Key Points - ") :]
    first = body.split(" - ", 1)[0]
    again = body.find(first, len(first))
    return body[again:] if again > 0 else answer


def drop_heading_question(answer: str) -> str:
    """GARD: drop an opening heading that restates the question ('How might X be treated? ...')."""
    return _HEADING_QUESTION.sub("", answer, count=1)


CLEANERS: dict[str, Callable[[str], str]] = {
    "key-points": drop_key_points,
    "heading-question": drop_heading_question,
    "hpo-note": lambda a: _HPO_NOTE.sub("", a),
    "video-note": lambda a: _VIDEO_NOTE.sub("", a),
}
"""Named, optional answer cleaners (``--clean NAME[,NAME]``), each documented where defined."""


def clean_records(
    records: Iterable[QARecord], cleaners: Sequence[str]
) -> tuple[list[QARecord], int]:
    """Apply the named cleaners; records whose answer becomes empty are dropped (count returned)."""
    unknown = set(cleaners) - set(CLEANERS)
    if unknown:
        raise MedQuADError(
            f"--clean: unknown cleaner(s) {sorted(unknown)}; choose from {sorted(CLEANERS)}"
        )
    out, emptied = [], 0
    for rec in records:
        answer = rec.answer
        for name in cleaners:
            answer = collapse(CLEANERS[name](answer))
        if not answer:
            emptied += 1
            continue
        out.append(rec if answer == rec.answer else QARecord(**{**asdict(rec), "answer": answer}))
    return out, emptied


# --- deduplication and splits -----------------------------------------------------------------
def normalize_question(q: str) -> str:
    """Lower-case, collapsed whitespace, trailing '?' and spaces stripped."""
    return collapse(q).lower().rstrip("? ")


def normalize_answer(a: str) -> str:
    return collapse(a).lower()


def drop_exact_duplicates(records: Sequence[QARecord]) -> tuple[list[QARecord], int]:
    """Keep the first (by id) of each identical (question, answer) pair."""
    seen, out = set(), []
    for rec in records:
        key = (rec.question, rec.answer)
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out, len(records) - len(out)


def leakage_groups(records: Sequence[QARecord]) -> list[list[int]]:
    """Connected components of records linked by a shared normalised question or answer."""
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, rec in enumerate(records):
        for key in ("q:" + normalize_question(rec.question), "a:" + normalize_answer(rec.answer)):
            j = first_with.setdefault(key, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(records)):
        groups[find(i)].append(i)
    return list(groups.values())


def split_records(
    records: Sequence[QARecord], valid_size: int, test_size: int, seed: int
) -> dict[str, list[QARecord]]:
    """Deterministic, leakage-free split.

    Groups (:func:`leakage_groups`) are visited in the order of ``sha256(seed:first id)``; a group
    goes to test if it fits in what test still needs, else to valid if it fits there, else to
    train. Sizes are met exactly unless large groups (e.g. one boilerplate answer shared by
    hundreds of questions) cannot fit; those stay in train.
    """
    groups = leakage_groups(records)
    order = sorted(
        groups, key=lambda g: hashlib.sha256(f"{seed}:{records[g[0]].id}".encode()).hexdigest()
    )
    want = {"test": test_size, "valid": valid_size}
    splits: dict[str, list[QARecord]] = {"train": [], "valid": [], "test": []}
    for group in order:
        target = next(
            (s for s in ("test", "valid") if len(splits[s]) + len(group) <= want[s]), "train"
        )
        splits[target].extend(records[i] for i in group)
    for name in splits:
        splits[name].sort(key=lambda r: r.id)
    return splits
