"""A NetParameter prototxt cut into its layers, and the layers a phase includes.

The protobuf text format is parsed by the protobuf runtime, layer by layer: the scanner here
only finds each ``layer { ... }`` (or legacy ``layers { ... }``) block and the line it starts
on. A layer's header (name, type, tops, rules) is read leniently, so the bodies of layers
this package does not build (``convolution_param``, ...) are skipped; a data layer is then
read strictly, so that a misspelt field is an error naming its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Layer", "included", "layers_of", "read_net_text"]


_MAX_DEPTH = 100  # blocks nested deeper are refused, as protobuf's C++ parser refuses them

@dataclass(frozen=True)
class Layer:
    """One layer block: the text between its braces, and the file's line that text starts on."""

    text: str
    line: int
    legacy: bool  # a V1 ``layers { }`` block


def read_net_text(path: str) -> str:
    """A prototxt's text (UTF-8, as protobuf's text format is).

    Raises:
        ValueError: bytes that are not UTF-8, naming the line, the byte offset and the remedy.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}, line {line} (byte {exc.start}): {raw[exc.start:exc.start + 4]!r} is not "
                         "UTF-8. Remedy: save the prototxt as UTF-8 text.") from None


def _skip_space(text: str, at: int) -> int:
    n = len(text)
    while at < n:
        if text[at] in " \t\r\n,;":
            at += 1
        elif text[at] == "#":
            end = text.find("\n", at)
            at = n if end < 0 else end + 1
        else:
            break
    return at


def _skip_string(text: str, at: int) -> int:
    quote, at = text[at], at + 1
    while at < len(text) and text[at] != quote:
        at += 2 if text[at] == "\\" else 1
    return at + 1


def _close_of(text: str, at: int, path: str, opens: str = "{<", closes: str = "}>") -> int:
    """The index just past the bracket matching the one at ``at``."""
    depth, start = 0, at
    while at < len(text):
        ch = text[at]
        if ch in "\"'":
            at = _skip_string(text, at)
            continue
        if ch == "#":
            end = text.find("\n", at)
            at = len(text) if end < 0 else end + 1
            continue
        if ch in opens:
            depth += 1
            if depth > _MAX_DEPTH:
                line = text.count("\n", 0, at) + 1
                raise ValueError(f"{path}, line {line}: blocks nested more than {_MAX_DEPTH} deep, which "
                                 "protobuf's parser refuses too: the file is corrupt or no prototxt")
        elif ch in closes:
            depth -= 1
            if depth == 0:
                return at + 1
        at += 1
    line = text.count("\n", 0, start) + 1
    raise ValueError(f"{path}, line {line}: this block is never closed (a missing '}}')")


def layers_of(text: str, path: str) -> list[Layer]:
    """Every ``layer``/``layers`` block of a NetParameter, in order; other fields are skipped."""
    found, at, n = [], _skip_space(text, 0), len(text)
    counted, lines = 0, 1  # the line of text[counted], counted as the scan goes (once per byte)
    while at < n:
        start = at
        while at < n and (text[at].isalnum() or text[at] in "_."):
            at += 1
        key = text[start:at]
        if not key:
            line = text.count("\n", 0, at) + 1
            raise ValueError(f"{path}, line {line}: expected a field name, found {text[at:at + 20]!r}")
        at = _skip_space(text, at)
        if at < n and text[at] == ":":
            at = _skip_space(text, at + 1)
        if at < n and text[at] in "{<":
            end = _close_of(text, at, path)
            if key in ("layer", "layers"):
                lines, counted = lines + text.count("\n", counted, at), at
                found.append(Layer(text[at + 1 : end - 1], lines, key == "layers"))
            at = end
        elif at < n and text[at] == "[":
            at = _close_of(text, at, path, "[", "]")
        elif at < n and text[at] in "\"'":
            at = _skip_string(text, at)
            while _skip_space(text, at) < n and text[_skip_space(text, at)] in "\"'":
                at = _skip_string(text, _skip_space(text, at))  # adjacent strings concatenate
        else:
            while at < n and not text[at].isspace() and text[at] not in "#,;{}":
                at += 1
        at = _skip_space(text, at)
    return found


def _meets(rule: Any, phase: int, level: int, stages: frozenset[str]) -> bool:
    """Caffe's ``Net::StateMeetsRule``."""
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    return all(s in stages for s in rule.stage) and not any(s in stages for s in rule.not_stage)


def included(header: Any, phase: int, level: int, stages: frozenset[str], where: str) -> bool:
    """Caffe's ``Net::FilterNet`` for one layer: included by a met ``include`` rule, or, without
    include rules, unless an ``exclude`` rule is met.

    Raises:
        ValueError: both include and exclude rules (Caffe refuses them too).
    """
    if header.include and header.exclude:
        raise ValueError(f"{where}: specify either include rules or exclude rules, not both (as Caffe requires)")
    if header.include:
        return any(_meets(rule, phase, level, stages) for rule in header.include)
    return not any(_meets(rule, phase, level, stages) for rule in header.exclude)
