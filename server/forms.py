"""Multipart forms (audio uploads, image edits): split into plain fields and uploaded files,
and validate the fields with a wire schema so bad values are the same 400 as a JSON body's."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

Schema = TypeVar("Schema", bound=BaseModel)


async def read_form(
    request: Request, file_fields: tuple[str, ...]
) -> tuple[dict[str, object], dict[str, bytes]]:
    """Fields (a list for `name[]` keys) and the bytes of each named file field that holds a
    file (`image` or `image[]`: the first file)."""
    fields: dict[str, object] = {}
    files: dict[str, bytes] = {}
    async with request.form() as form:
        for key in form:
            values = form.getlist(key)
            name = key.removesuffix("[]")
            if name in file_fields:
                upload = next((v for v in values if isinstance(v, UploadFile)), None)
                if upload is not None:
                    files[name] = await upload.read()
                continue
            fields[key] = values if key.endswith("[]") else values[-1]
    return fields, files


def validate_form(schema: type[Schema], fields: dict[str, object]) -> Schema:
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def multipart_body(
    schema: type[BaseModel], files: tuple[str, ...], optional_files: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its form with `read_form`: a multipart/form-data
    request body with the schema's fields and each file field as binary."""
    fields = schema.model_json_schema(by_alias=True)
    assert "$defs" not in fields, "form fields are flat"
    binary = {"type": "string", "format": "binary"}
    properties: dict[str, Any] = {name: binary for name in (*files, *optional_files)}
    properties.update({name: _formable(field) for name, field in fields["properties"].items()})
    body = {"type": "object", "properties": properties,
            "required": [*files, *fields.get("required", [])]}
    return {"requestBody": {"required": True,
                            "content": {"multipart/form-data": {"schema": body}}}}


def _formable(field: dict[str, Any]) -> dict[str, Any]:
    """A form cannot carry null (an optional field is left out instead): drop that branch."""
    kinds = [kind for kind in field.get("anyOf", []) if kind != {"type": "null"}]
    if not kinds:
        return field
    rest = {key: value for key, value in field.items() if key != "anyOf"}
    return {**rest, **kinds[0]} if len(kinds) == 1 else {**rest, "anyOf": kinds}
