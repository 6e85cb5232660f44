"""Checks the served OpenAPI document and answers against it.

Usage: check_openapi.py DOC.json [SCHEMA_NAME ANSWER.json]...

Validates DOC.json as an OpenAPI 3.1 document (openapi-spec-validator, a validator nobody here
wrote), then each ANSWER.json against the document's `#/components/schemas/SCHEMA_NAME`
(JSON Schema 2020-12, references resolved within the document). Exits non-zero, saying what
failed, when anything does not hold.
"""

import json
import sys

import jsonschema
import referencing
from openapi_spec_validator import validate


def main() -> int:
    with open(sys.argv[1]) as f:
        doc = json.load(f)
    validate(doc)
    resource = referencing.Resource.from_contents(
        doc, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource("urn:ecars:openapi", resource)
    failures = []
    pairs = sys.argv[2:]
    for name, path in zip(pairs[::2], pairs[1::2]):
        with open(path) as f:
            answer = json.load(f)
        schema = {"$ref": f"urn:ecars:openapi#/components/schemas/{name}"}
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        errors = sorted(validator.iter_errors(answer), key=lambda e: list(e.path))
        for error in errors[:5]:
            failures.append(f"{path} as {name}: {list(error.path)}: {error.message}")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
