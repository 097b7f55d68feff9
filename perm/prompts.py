"""Prompt files in prompts/: named slots, rendered strictly (a missing or unexpected field is an error).

A prompt file holds chat messages, each introduced by a line `<<<system>>>` or `<<<user>>>`; slots
are `{name}`, literal braces are doubled. The policy's section headings are defined here once and
used both by the policy prompt and by the answer parser.
"""
from __future__ import annotations

import re
import string
from functools import lru_cache
from pathlib import Path

from perm.runs import PROMPTS_DIR

# PERM: the policy's two-section answer (docs/method.md, "The answer")
ANALYSIS_HEADING = "# Analysis"
RESPONSE_HEADING = "# Response"
ROLE_LINE = re.compile(r"^<<<(system|user|assistant)>>>\s*$", re.MULTILINE)


class PromptError(ValueError):
    pass


@lru_cache(maxsize=None)
def load_prompt(name: str, prompts_dir: str | None = None) -> tuple[tuple[str, str], ...]:
    """(role, template) pairs of prompts/<name>.txt."""
    path = Path(prompts_dir or PROMPTS_DIR) / f"{name}.txt"
    text = path.read_text()
    parts = ROLE_LINE.split(text)
    if parts[0].strip():
        raise PromptError(f"{path}: text before the first <<<role>>> line")
    messages = tuple((parts[i], parts[i + 1].strip("\n")) for i in range(1, len(parts), 2))
    if not messages:
        raise PromptError(f"{path}: no <<<system>>> or <<<user>>> section")
    return messages


def slots(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def render(name: str, **values) -> list[dict]:
    """Render prompts/<name>.txt into chat messages; every slot filled, no value left unused."""
    messages = load_prompt(name)
    wanted = set().union(*(slots(t) for _, t in messages))
    missing, extra = wanted - set(values), set(values) - wanted
    if missing or extra:
        raise PromptError(f"prompt {name!r}: missing fields {sorted(missing)}, unexpected {sorted(extra)}")
    for key, value in values.items():
        if not isinstance(value, str):
            raise PromptError(f"prompt {name!r}: field {key!r} must be a string, got {type(value).__name__}")
    return [{"role": role, "content": template.format(**values)} for role, template in messages]


def policy_prompt(case: dict, name: str = "policy") -> list[dict]:
    """The policy's chat prompt for a case: persona, scenario and query only (never the hidden need
    or the reference). `name` picks the prompt file: `policy` (the paper's: a warm, empathetic
    assistant writing the two sections) or `policy_guided` (also names what the judges reward)."""
    return render(name, persona=case["persona"], scenario=case["scenario"], query=case["query"],
                  analysis_heading=ANALYSIS_HEADING, response_heading=RESPONSE_HEADING)


_HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*(analysis|response)[ \t]*(?:\*\*|__)?[ \t]*"
    r"(?::[ \t]*(?:\*\*|__)?[ \t]*(?:$|(?=\S))|$)",   # alone on its line, or `Analysis: text` inline
    re.IGNORECASE | re.MULTILINE)


def split_sections(text: str) -> tuple[str, str] | None:
    """(analysis, response) of a two-section answer, or None when it is a format failure.

    Tolerates `#`/`##`/bold headings, any case, a trailing colon, and text on the heading's own line
    after a colon (`# Analysis: she is sad`). The first Analysis heading and the first Response
    heading after it count; both sections must have content.
    """
    analysis_at = response_at = None
    for m in _HEADING.finditer(text):
        kind = m.group(1).lower()
        if kind == "analysis" and analysis_at is None:
            analysis_at = m
        elif kind == "response" and analysis_at is not None:
            response_at = m
            break
    if analysis_at is None or response_at is None:
        return None
    analysis = text[analysis_at.end():response_at.start()].strip()
    response = text[response_at.end():].strip()
    if not analysis or not response:
        return None
    return analysis, response


def format_answer(analysis: str, response: str) -> str:
    return f"{ANALYSIS_HEADING}\n{analysis.strip()}\n{RESPONSE_HEADING}\n{response.strip()}"

