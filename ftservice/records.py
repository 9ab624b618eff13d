"""Typed hand-offs between stages: every file one stage writes and another reads.

Each file is a pydantic model (`extra="forbid"`, a `format_version`), validated when written
and when read, so a missing or misspelt key fails at the boundary with the file's name, not
as a KeyError three calls later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ftservice import storage
from ftservice.errors import FtserviceError

R = TypeVar("R", bound="Record")


class HandoffError(FtserviceError):
    """A hand-off file that is missing, not JSON, of another version, or of the wrong shape."""


class Strict(BaseModel):
    """A part of a hand-off: unknown keys are errors. NaN stays NaN (as Python's json)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Record(Strict):
    """A file one stage hands to the next. Subclasses set `format_version`'s default."""

    @classmethod
    def version(cls) -> int:
        return cls.model_fields["format_version"].default

    @classmethod
    def upgrade(cls, data: dict, found: Any) -> dict | None:
        """`data` of an older version rewritten as the current one; None: not readable."""
        return None

    @classmethod
    def parse(cls: type[R], data: object, source: str) -> R:
        if isinstance(data, dict) and data.get("format_version", cls.version()) != cls.version():
            found = data["format_version"]
            data = cls.upgrade(dict(data), found)
            if data is None:
                raise HandoffError(
                    f"{source}: format version {found!r}, but this ftservice reads version "
                    f"{cls.version()} of {cls.__name__}; it was written by another ftservice "
                    "release: use that release, or rewrite the file with this one."
                )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}"
                for err in e.errors(include_url=False)
            )
            raise HandoffError(
                f"{source}: not a valid {cls.__name__} (format version {cls.version()}): {problems}"
            ) from None

    @classmethod
    def read(cls: type[R], path: str | os.PathLike) -> R:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise HandoffError(f"{path}: missing ({cls.__name__} expected there)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise HandoffError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.parse(data, str(path))

    def dumps(self) -> str:
        # validate on write too: a model built with model_construct or mutated stays checked
        type(self).model_validate(self.model_dump())
        return self.model_dump_json(indent=2) + "\n"

    def write(self, path: str | os.PathLike) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        storage.write_text(str(path), self.dumps())
