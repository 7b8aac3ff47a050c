"""Reading a format's keys from a row, with errors that name the row and the column."""

from __future__ import annotations

from ..errors import DataError


def column(row: dict, fields: dict, key: str, where: str, optional: bool = False):
    name = fields[key]
    if name not in row or row[name] is None:
        if optional:
            return None
        raise DataError(f"{where}: no column {name!r} (the format's {key!r}; map it with data.fields.{key}; "
                        f"columns: {', '.join(row)})")
    return row[name]


def text_field(row: dict, fields: dict, key: str, where: str, optional: bool = False) -> str:
    value = column(row, fields, key, where, optional)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {fields[key]!r} ({key}) is {type(value).__name__}, not text")
    return value
