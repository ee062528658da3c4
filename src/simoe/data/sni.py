"""Super-NaturalInstructions task directories: official splits, checked task files, Tk-Instruct prompts."""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SNITask:
    """One SNI task file: ``data`` is the parsed JSON (``Instances`` capped as loaded)."""

    name: str
    category: str
    path: str
    data: dict

    @property
    def instances(self) -> list[dict]:
        """``[{"id", "input", "output": [reference, ...]}]`` in file order."""
        return self.data["Instances"]


def sni_prompt(task: dict, instance: dict, num_pos_examples: int = 2) -> str:
    """The Tk-Instruct "definition + positive examples" encoding of an SNI instance.

    Reproduces ``DataCollatorForNI`` of yizhongw/Tk-Instruct (``src/ni_collator.py``) with
    ``add_task_definition=True``, no task name, no negative examples, no explanations, character for
    character, including its quirks (a "." appended to text not ending in punctuation, the leading
    spaces of " Positive Example" and " Output:"). Unlike the collator it never drops examples to fit a
    length; :func:`tokenize_record` truncates the prompt instead.
    """

    def end(text: str) -> str:  # Tk-Instruct checks the string built so far, not the field alone
        return text if text[-1] in string.punctuation else text + "."

    definition = task["Definition"]
    definition = definition[0] if isinstance(definition, list) else definition
    source = end("Definition: " + definition.strip()) + "\n\n"
    for i, example in enumerate(task["Positive Examples"][:num_pos_examples]):
        text = end(f" Positive Example {i + 1} -\nInput: {example['input'].strip()}") + "\n"
        text = end(text + f" Output: {example['output'].strip()}") + "\n"
        source += text + "\n"
    return source + end(f"Now complete the following example -\nInput: {instance['input'].strip()}") + (
        "\nOutput: "
    )


def _sni_split_names(directory: Path, split: str) -> set[str]:
    path = directory / "splits" / f"{split}_tasks.txt"
    if not path.is_file():
        raise ValueError(f"{directory}: no split list {path.relative_to(directory)} for split={split!r}")
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def _check_sni_task(data: object, path: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (an SNI task)")
    for field in ("Definition", "Categories", "Positive Examples", "Instances"):
        if field not in data:
            raise ValueError(f"{path}: field {field!r} is missing")
    if not isinstance(data["Categories"], list) or not data["Categories"]:
        raise ValueError(f"{path}: field 'Categories' must be a non-empty list")
    for key in ("Positive Examples", "Instances"):
        for i, item in enumerate(data[key]):
            if not isinstance(item, dict) or not isinstance(item.get("input"), str):
                raise ValueError(f"{path}: {key}[{i}]: field 'input' must be a string")
            out = item.get("output")  # an example has one output, an instance a list of references
            if key == "Positive Examples" and not isinstance(out, str):
                raise ValueError(f"{path}: {key}[{i}]: field 'output' must be a string")
            references = isinstance(out, list) and out and all(isinstance(o, str) for o in out)
            if key == "Instances" and not references:
                raise ValueError(f"{path}: {key}[{i}]: field 'output' must be a non-empty list of strings")


def load_sni_tasks(
    directory: str | os.PathLike, split: str | None = None, max_instances_per_task: int | None = None
) -> list[SNITask]:
    """The task files of an SNI directory (``tasks/*.json``, ``splits/{train,test}_tasks.txt``).

    ``split`` keeps the tasks listed in the official split list (tasks of the list missing from
    ``tasks/`` are skipped: the directory may be a subset); ``None`` keeps every task file present.
    ``max_instances_per_task`` keeps the first N instances of each task, in file order. Tasks are
    sorted by name.
    """
    directory = Path(directory)
    files = sorted((directory / "tasks").glob("*.json"))
    if not files:
        raise ValueError(f"{directory}: no SNI task files tasks/*.json")
    if split is not None:
        names = _sni_split_names(directory, split)
        files = [f for f in files if f.stem in names]
    tasks = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:line {e.lineno}: invalid JSON: {e.msg}") from e
        _check_sni_task(data, str(file))
        if max_instances_per_task is not None:
            data["Instances"] = data["Instances"][:max_instances_per_task]
        tasks.append(SNITask(file.stem, data["Categories"][0], str(file), data))
    return tasks


def sni_records(tasks: list[SNITask]) -> list[dict]:
    # One example per instance, trained on its first reference. An empty reference is the task's
    # real answer (e.g. removing the vowels of "a"), so it is kept: the target is then end-of-turn only.
    return [
        {"messages": [{"role": "user", "content": sni_prompt(task.data, inst)},
                      {"role": "assistant", "content": inst["output"][0]}],
         "group": task.name, "origin": f"{task.path}:index {i}"}
        for task in tasks for i, inst in enumerate(task.instances)
    ]

