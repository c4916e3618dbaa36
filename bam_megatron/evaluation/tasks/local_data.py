"""lm-eval ``custom_dataset`` loader of the local tasks: JSONL files beside this module, no download."""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file, one JSON object per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(data_files: dict[str, str], **_metadata):
    """A ``datasets.DatasetDict`` of ``{split: file name here}`` (lm-eval passes the task's
    ``dataset_kwargs`` and ``metadata`` as keyword arguments)."""
    import datasets

    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(read_jsonl(os.path.join(HERE, name))) for split, name in data_files.items()}
    )
