"""WebDataset's sample rules: shard brace patterns, grouping tar members into samples, decoding members.

Each follows webdataset's own code (``braceexpand``, ``tariterators.group_by_keys``,
``autodecode.Decoder`` with ``"rgb8"``), so a sample here has the key, the members and the
values webdataset gives; where we differ on purpose (nothing is unpickled) it is said below.

Example:
    >>> expand_braces("shard-{000..002}.tar")
    ['shard-000.tar', 'shard-001.tar', 'shard-002.tar']
    >>> group_samples([("a.jpg", 512, 9), ("a.cls", 1536, 1), ("b.cls", 2560, 1)])
    [('a', [('jpg', 512, 9), ('cls', 1536, 1)]), ('b', [('cls', 2560, 1)])]
"""

from __future__ import annotations

import itertools
import json
import re
import string
from typing import Any

from agnostic_prefetch.sources._wds_arrays import DEFAULT_LIMIT, gunzip, load_npy, load_npz
from agnostic_prefetch.sources.images import decode_image

__all__ = ["IMAGE_EXTENSIONS", "decode_member", "expand_braces", "group_samples"]

_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_ALPHABET = string.ascii_uppercase + string.ascii_lowercase


def _int_range(start: str, end: str, step: str | None) -> list[str]:
    padded = any(s.startswith(("0", "-0")) for s in (start, end) if s not in ("0", "-0"))
    width = max(len(start), len(end)) if padded else 0
    by = (int(step) or 1) if step else 1
    a, b = int(start), int(end)
    values = range(a, b + 1, by) if a < b else range(a, b - 1, -by)
    return [f"{v:0{width}d}" for v in values]


def _char_range(start: str, end: str, step: str | None) -> list[str]:
    by = (int(step) or 1) if step else 1
    a, b = _ALPHABET.index(start), _ALPHABET.index(end)
    return list(_ALPHABET[a:b + 1:by] if a < b else _ALPHABET[a:(b or -len(_ALPHABET)) - 1:-by])


def _alternatives(expr: str) -> list[str] | None:
    """What ``{expr}`` stands for: a range, a comma list, or ``None`` (kept literally)."""
    for regex, make in ((_INT_RANGE, _int_range), (_CHAR_RANGE, _char_range)):
        match = regex.match(expr)
        if match:
            return make(*match.groups())
    depth, start, pieces = 0, 0, []
    for pos, ch in enumerate(expr):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            pieces.append(expr[start:pos])
            start = pos + 1
    if depth or not pieces:
        return None
    pieces.append(expr[start:])
    return [text for piece in pieces for text in expand_braces(piece)]


def expand_braces(pattern: str) -> list[str]:
    """``pattern`` with its braces expanded as ``braceexpand`` (webdataset's) does: ``{a,b}``,
    ``{000..009}`` (zero-padded when an end is), ``{a..e}``, steps ``{0..10..2}``, nesting.
    Backslash escapes are not interpreted.

    Raises:
        ValueError: unbalanced braces.
    """
    parts: list[list[str]] = []
    depth = start = 0
    for pos, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                parts.append([pattern[start:pos]])
                start = pos
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                break
            if depth == 0:
                expr = pattern[start + 1:pos]
                found = _alternatives(expr)
                parts.append(found if found is not None else [f"{{{e}}}" for e in expand_braces(expr)])
                start = pos + 1
    if depth:
        raise ValueError(f"unbalanced braces in the shard pattern {pattern!r}")
    parts.append([pattern[start:]])
    return ["".join(p) for p in itertools.product(*parts)]


# webdataset's base_plus_ext: the key is the path up to the first dot of the base name.
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")  # tar_file_iterator's skip_meta


def group_samples(members: list[tuple[str, int, int]], *, where: str = "the shard"
                  ) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Members ``(name, offset, size)`` grouped into samples ``(key, [(extension, offset, size)])``.

    As webdataset's ``group_by_keys``: consecutive members with one key form a sample,
    extensions lower-cased; members named like ``__meta__`` and names without an extension
    are skipped.

    Raises:
        ValueError: one extension twice in a sample (webdataset raises too).
    """
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    for name, offset, size in members:
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
            continue
        match = _BASE_PLUS_EXT.match(name)
        if not match:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        if ext in ("__key__", "__url__") or any(e == ext for e, _, _ in samples[-1][1]):
            raise ValueError(
                f"{where}: member {name!r} (data at byte {offset}) repeats extension {ext!r} in sample "
                f"{key!r}; webdataset refuses this too. Remedy: give each file of a sample its own "
                "extension, or each sample its own key, and write the shard again.")
        samples[-1][1].append((ext, offset, size))
    return samples


# webdataset's autodecode.IMAGE_EXTENSIONS, less those Pillow only identifies or needs an
# outside program for (bufr, grib, h5, hdf, fit(s), eps, ps, mpg, mpeg, wmf, emf): those stay bytes.
IMAGE_EXTENSIONS = frozenset(
    "blp bmp dib cur pcx dcx dds fli flc ftc ftu gbr gif png apng jp2 j2k jpc jpf jpx j2c icns ico "
    "im iim tif tiff jfif jpe jpg jpeg msp pcd pxr pbm pgm ppm pnm psd bw rgb rgba sgi ras tga icb "
    "vda vst webp xbm xpm".split())
_TEXT = {"txt", "text", "transcript"}
_INT = {"cls", "cls2", "index", "inx", "id"}
_JSON = {"json", "jsn"}


def decode_member(ext: str, data: bytes, *, name: str, limit: int = DEFAULT_LIMIT) -> Any:
    """A member's value as webdataset's ``decode("rgb8")`` gives it: images H×W×3 uint8 RGB,
    ``cls`` and the like ``int``, text ``str``, ``json`` the parsed value, ``npy`` the array
    (``npz`` a dict of arrays), a ``.gz`` suffix decompressed first, anything else the bytes
    (pickles and torch files included: never unpickled). The last dotted part of the
    extension decides (``seg.png`` is an image). Nothing allocates more than the member's
    bytes allow: an array header is checked against the bytes after it, and decompression
    (``.gz``, an ``npz``'s entries) stops past ``limit`` bytes.

    Raises:
        ValueError: a value its decoder refuses, naming ``name``.
    """
    if ext.startswith("__"):  # webdataset's decoder passes "__" fields through as text
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data
    if ("." + ext).endswith(".gz"):
        data, ext = gunzip(data, name=name, limit=limit), ext[:-3]
    last = ext.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        return decode_image(data, name=name, color=True)
    if last == "npy":
        return load_npy(data, name=name)
    if last == "npz":
        return load_npz(data, name=name, limit=limit)
    try:
        if last in _TEXT:
            return data.decode("utf-8")
        if last in _INT:
            return int(data)
        if last in _JSON:
            return json.loads(data)
    except (ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise ValueError(f"cannot decode {name} as .{last}: {exc}") from None
    return data
