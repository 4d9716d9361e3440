"""``/docs``: the API reference as one self-contained HTML page, rendered from the OpenAPI spec.

FastAPI's own ``/docs`` (Swagger UI) and ``/redoc`` load their scripts from a CDN, which a cluster
without internet access cannot reach. This page needs nothing beyond the collector: every endpoint
with its parameters, body and answers, then every schema with its fields. ``/openapi.json`` is the
machine-readable spec, for any OpenAPI tool.
"""

from __future__ import annotations

from html import escape

_METHODS = ("get", "post", "put", "patch", "delete")
_STYLE = """body{font-family:sans-serif;max-width:72em;margin:1em auto;padding:0 1em;line-height:1.4}
code,pre{font-family:monospace}table{border-collapse:collapse;margin:.3em 0 1em}
td,th{border:1px solid #ccc;padding:.15em .5em;text-align:left;vertical-align:top}
h3{margin-bottom:.2em}.m{font-weight:bold;text-transform:uppercase}"""


def type_of(schema: dict) -> str:
    """A short readable type of a JSON schema: ``integer``, ``number | null``, ``array of ResultRow``."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(type_of(s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    if "const" in schema:
        return repr(schema["const"])
    kind = schema.get("type", "any")
    if kind == "array":
        return "array of " + type_of(schema.get("items", {}))
    if kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return "object of " + type_of(schema["additionalProperties"])
    return str(kind)


def _limits(schema: dict) -> str:
    parts = []
    for key, sign in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
    ):
        if key in schema:
            parts.append(f"{sign} {schema[key]}")
    for sub in schema.get("anyOf", ()):
        parts.append(_limits(sub))
    return ", ".join(p for p in parts if p)


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    if not rows:
        return ""
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>")
    return "".join(out) + "</table>"


def _operation(path: str, method: str, op: dict) -> str:
    out = [f'<h3 id="{escape(method + path)}"><span class="m">{escape(method)}</span> <code>{escape(path)}</code></h3>']
    text = op.get("description") or op.get("summary") or ""
    if text:
        out.append(f"<p>{escape(text)}</p>")
    params = [
        (
            p.get("name", ""),
            p.get("in", ""),
            "yes" if p.get("required") else "no",
            type_of(p.get("schema", {})),
            _limits(p.get("schema", {})),
        )
        for p in op.get("parameters", ())
    ]
    out.append(_table(("parameter", "in", "required", "type", "limits"), params))
    body = op.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        out.append(f"<p>Body ({escape(media)}): <code>{escape(type_of(content.get('schema', {})))}</code></p>")
    answers = []
    for code, resp in op.get("responses", {}).items():
        schemas = [type_of(c.get("schema", {})) for c in resp.get("content", {}).values() if c.get("schema")]
        answers.append((code, resp.get("description", ""), ", ".join(schemas)))
    out.append(_table(("answer", "meaning", "body"), answers))
    return "\n".join(out)


def _schema(name: str, schema: dict) -> str:
    required = set(schema.get("required", ()))
    rows = [
        (field, type_of(sub), "yes" if field in required else "no", _limits(sub), sub.get("description", ""))
        for field, sub in schema.get("properties", {}).items()
    ]
    out = [f'<h3 id="schema-{escape(name)}"><code>{escape(name)}</code></h3>']
    if schema.get("description"):
        out.append(f"<p>{escape(schema['description'])}</p>")
    if schema.get("additionalProperties") is False:
        out.append("<p>Other fields are refused.</p>")
    out.append(_table(("field", "type", "required", "limits", "meaning"), rows))
    return "\n".join(out)


def render_docs(spec: dict) -> str:
    """The reference page of ``spec`` (an OpenAPI document), with no external resource."""
    info = spec.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    ops = [
        (path, method, op)
        for path, item in sorted(spec.get("paths", {}).items())
        for method, op in item.items()
        if method in _METHODS
    ]
    toc = "".join(
        f'<li><a href="#{escape(m + p)}"><span class="m">{escape(m)}</span> <code>{escape(p)}</code></a>'
        f" {escape(op.get('summary', ''))}</li>"
        for p, m, op in ops
    )
    schemas = spec.get("components", {}).get("schemas", {})
    parts = [
        f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>{escape(info.get('description', ''))}</p>",
        "<p>This page is served by the collector itself and loads nothing from elsewhere. The machine-readable "
        'spec is <a href="/openapi.json"><code>/openapi.json</code></a>: load it into any OpenAPI tool.</p>',
        f"<h2>Endpoints</h2><ul>{toc}</ul>",
        *(_operation(p, m, op) for p, m, op in ops),
        "<h2>Schemas</h2>",
        *(_schema(name, schemas[name]) for name in sorted(schemas)),
        "</body></html>",
    ]
    return "\n".join(parts)
