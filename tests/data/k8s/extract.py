#!/usr/bin/env python3
"""Write the schema of one published Kubernetes API type as test data (see README.md).

    extract.py crd CRD.yaml VERSION OUT.json        # a CRD's openAPIV3Schema for one version
    extract.py swagger SWAGGER.json OUT.json DEF...  # Kubernetes' own types: the named
                                                     # definitions and every one they reference

The only change to the published text: `description` strings are left out (prose, most of
the size; no validation depends on it). Nothing else is added, removed or reordered.
"""

from __future__ import annotations

import json
import sys

import yaml

SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
SCHEMA_ONE = ("items", "additionalProperties", "not")


def strip(schema):
    """A schema without its description strings (a property *named* description stays)."""
    if isinstance(schema, list):
        return [strip(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in SCHEMA_MAPS:
            out[key] = {name: strip(s) for name, s in value.items()}
        elif key in SCHEMA_LISTS or key in SCHEMA_ONE:
            out[key] = strip(value)
        else:
            out[key] = value
    return out


def from_crd(path: str, version: str) -> dict:
    crd = yaml.safe_load(open(path))
    [v] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version,
            "schema": strip(v["schema"]["openAPIV3Schema"])}


def from_swagger(path: str, roots: list[str]) -> dict:
    definitions = json.load(open(path))["definitions"]
    wanted, todo = {}, list(roots)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted[name] = definitions[name]
        text = json.dumps(definitions[name])
        todo += [ref.split('"', 1)[0] for ref in text.split('"$ref": "#/definitions/')[1:]]
    return strip({"definitions": {k: wanted[k] for k in sorted(wanted)}})


if __name__ == "__main__":
    kind, src, *rest = sys.argv[1:]
    if kind == "crd":
        version, out = rest
        data = from_crd(src, version)
    else:
        out, *roots = rest
        data = from_swagger(src, roots)
    with open(out, "w") as f:
        json.dump(data, f, indent=None, separators=(",", ":"), sort_keys=False)
        f.write("\n")
