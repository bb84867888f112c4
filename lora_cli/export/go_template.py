"""A small Go text/template renderer, for the constructs ollama.go_template() writes: checks the translation.

if / else if / else / end, range with $i, $_ variables, := assignments, fields of . and $, string and integer
literals, parentheses, and the functions eq, ne, and, or, not, len, slice and index.
"""

from __future__ import annotations

import json
import re
from typing import Any

_GO_TOKEN = re.compile(r'\(|\)|"(?:\\.|[^"\\])*"|:=|,|[^\s(),]+')
_GO_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b, "not": lambda a: not _go_truth(a),
    "and": lambda *xs: next((x for x in xs if not _go_truth(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _go_truth(x)), xs[-1]),
    "len": len, "slice": lambda x, i=0, j=None: x[i:j], "index": lambda x, *keys: _go_index(x, keys),
}


def _go_index(x: Any, keys: tuple) -> Any:
    for key in keys:
        x = x[key]
    return x


def _go_truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)


def render_go_template(template: str, data: dict) -> str:
    nodes, _, end = _go_parse(_go_lex(template), 0)
    if end is not None:
        raise ValueError(f"unexpected {{{{ {end} }}}}")
    out: list[str] = []
    _go_exec(nodes, data, {"$": data}, out)
    return "".join(out)


def _go_lex(template: str) -> list[tuple[str, str]]:
    """[("text", ...), ("action", ...)], with {{- and -}} already applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos = 0
    while (start := template.find("{{", pos)) >= 0:
        text = template[pos:start]
        end = start + 2
        while not template.startswith("}}", end):  # skip over string literals, which may hold }}
            if end >= len(template):
                raise ValueError("unclosed action")
            end = _GO_TOKEN.match(template, end).end() if template[end] == '"' else end + 1
        action = template[start + 2:end]
        if action.startswith("- "):
            text, action = text.rstrip(), action[2:]
        items.append(("text", text))
        trim_next = action.endswith(" -")
        items.append(("action", action.removesuffix(" -").strip()))
        pos = end + 2
        if trim_next:
            pos = len(template) - len(template[pos:].lstrip())
    items.append(("text", template[pos:]))
    return [(kind, value) for kind, value in items if kind == "action" or value]


def _go_parse(items: list[tuple[str, str]], pos: int) -> tuple[list, int, str | None]:
    """Nodes up to the next end/else (returned as the third item), from items[pos]."""
    nodes: list = []
    while pos < len(items):
        kind, value = items[pos]
        pos += 1
        keyword = value.split(None, 1)[0] if kind == "action" and value else ""
        if kind == "text":
            nodes.append(("text", value))
        elif keyword in ("end", "else"):
            return nodes, pos, value
        elif keyword == "if":
            branches, condition = [], value[2:].strip()
            while True:
                body, pos, end = _go_parse(items, pos)
                branches.append((condition, body))
                if end is None:
                    raise ValueError("{{ if }} without {{ end }}")
                if end == "end":
                    break
                condition = end.removeprefix("else").strip().removeprefix("if").strip() or None
            nodes.append(("if", branches))
        elif keyword == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w*)\s*(?:,\s*(\$\w*)\s*)?:=\s*)?(.+)", value, re.S)
            body, pos, end = _go_parse(items, pos)
            if end != "end":
                raise ValueError("{{ range }} without {{ end }}")
            nodes.append(("range", m.group(1), m.group(2), m.group(3), body))
        elif m := re.fullmatch(r"(\$\w+)\s*:?=\s*(.+)", value, re.S):
            nodes.append(("set", m.group(1), m.group(2)))
        else:
            nodes.append(("print", value))
    return nodes, pos, None


def _go_exec(nodes: list, dot: Any, scope: dict, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            value = _go_eval(node[1], dot, scope)
            out.append("<no value>" if value is None else str(value).lower() if isinstance(value, bool) else
                       str(value))
        elif kind == "set":
            scope[node[1]] = _go_eval(node[2], dot, scope)
        elif kind == "if":
            for condition, body in node[1]:
                if condition is None or _go_truth(_go_eval(condition, dot, scope)):
                    _go_exec(body, dot, dict(scope), out)
                    break
        elif kind == "range":
            _, index_var, value_var, expr, body = node
            if value_var is None:  # {{ range $x := ... }} names the element, not the index
                index_var, value_var = None, index_var
            for i, item in enumerate(_go_eval(expr, dot, scope) or []):
                inner = dict(scope)
                inner.update({k: v for k, v in ((index_var, i), (value_var, item)) if k})
                _go_exec(body, item, inner, out)


def _go_eval(expr: str, dot: Any, scope: dict) -> Any:
    tokens = _GO_TOKEN.findall(expr)
    value, pos = _go_command(tokens, 0, dot, scope)
    if pos != len(tokens):
        raise ValueError(f"cannot evaluate {expr!r}")
    return value


def _go_command(tokens: list[str], pos: int, dot: Any, scope: dict) -> tuple[Any, int]:
    """A function call or a single operand, up to a closing parenthesis or the end."""
    args: list[Any] = []
    function = tokens[pos] if pos < len(tokens) and tokens[pos] in _GO_FUNCS else None
    pos += function is not None
    while pos < len(tokens) and tokens[pos] != ")":
        if tokens[pos] == "(":
            value, pos = _go_command(tokens, pos + 1, dot, scope)
            pos += 1  # the closing parenthesis
        else:
            value, pos = _go_operand(tokens[pos], dot, scope), pos + 1
        args.append(value)
    if function is not None:
        return _GO_FUNCS[function](*args), pos
    if len(args) != 1:
        raise ValueError(f"cannot evaluate {' '.join(tokens)!r}")
    return args[0], pos


def _go_operand(token: str, dot: Any, scope: dict) -> Any:
    if token.startswith('"'):
        return json.loads(token)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token in ("true", "false"):
        return token == "true"
    if token.startswith("$"):
        name, _, path = token.partition(".")
        value = scope[name]
    elif token.startswith("."):
        value, path = dot, token[1:]
    else:
        raise ValueError(f"unknown function or value {token!r}")
    for part in filter(None, path.split(".")):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return value
