"""Deterministic, diff-friendly, compact JSON.

Containers that fit in `width` columns stay on one line; when a dict has to be expanded,
consecutive members that fit on one line are packed onto shared lines. The output is plain
JSON (json.load reads it back unchanged).
"""

import json


def _one(obj):
    return json.dumps(obj, separators=(", ", ": "))


def dumps(obj, width=120, indent=1, _level=0):
    one = _one(obj)
    pad = " " * (indent * _level)
    if len(one) + len(pad) <= width or not isinstance(obj, (dict, list)) or not obj:
        return one
    inner = " " * (indent * (_level + 1))
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            # Pack scalars: as many per line as fit.
            lines, cur = [], ""
            for v in obj:
                tok = _one(v)
                if cur and len(inner) + len(cur) + 2 + len(tok) <= width:
                    cur += ", " + tok
                else:
                    if cur:
                        lines.append(inner + cur)
                    cur = tok
            lines.append(inner + cur)
            return "[\n" + ",\n".join(lines) + "\n" + pad + "]"
        items = [inner + dumps(v, width, indent, _level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    lines, cur = [], ""
    for k, v in obj.items():
        member = f"{json.dumps(str(k))}: {_one(v)}"
        if len(inner) + len(member) <= width:
            if cur and len(inner) + len(cur) + 2 + len(member) <= width:
                cur += ", " + member
            else:
                if cur:
                    lines.append(inner + cur)
                cur = member
            continue
        if cur:
            lines.append(inner + cur)
            cur = ""
        lines.append(f"{inner}{json.dumps(str(k))}: {dumps(v, width, indent, _level + 1)}")
    if cur:
        lines.append(inner + cur)
    return "{\n" + ",\n".join(lines) + "\n" + pad + "}"


def dump(obj, path):
    text = dumps(obj)
    assert json.loads(text) == json.loads(json.dumps(obj)), "compact_json round trip"
    with open(path, "w") as f:
        f.write(text)
        f.write("\n")
