"""The one way options are saved: a dataclass written as a JSON object and read back checked."""

from __future__ import annotations

import dataclasses
import os

from simoe.io import load_json_object, save_json


class JSONConfig:
    """Base of the option dataclasses (``SIMoEConfig``, ``BaselineConfig``): dict and JSON file
    round trips, with unknown fields and invalid values reported against the file they came from."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config"):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write the options as a JSON object to ``path`` (atomically)."""
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """The options saved at ``path``; a missing file, bad JSON, an unknown field or an invalid
        value is an error naming ``path``."""
        return cls.from_dict(load_json_object(path), source=os.fspath(path))

    @classmethod
    def load_from(cls, directory: str | os.PathLike, name: str):
        """The options saved as ``name`` in a saved model ``directory``."""
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {name} in {directory}")
        return cls.load(path)
