"""Build the de-en / zh-en LibreOffice help parallel corpus (paragraph aligned).

    python -m tasks.corpora.libreoffice --out tasks/data/libreoffice_help [--debs DIR] [--workdir DIR]

Source: Debian's ``libreoffice-help-{de,en-us,zh-cn}`` (``apt-get download`` unless
``--debs DIR`` holds them; unpacked with ``dpkg-deb -x``).  The pages
``usr/share/libreoffice/help/<lang>/text/**/*.html`` are generated from the same XHP
sources in every language, so units are aligned on the key (page path, id, occurrence).

* Units: ``p`` and ``h1``-``h6`` (table cells, list items, notes hold ``<p id>``s).
  Key id: the element ``id``; else its first ``<a name>`` anchor as ``a:<name>``
  (``class="embedded"`` paragraphs transcluded from other pages, "To access this
  command" / "Related Topics" headers); else ``noid`` (anchorless transcluded notes),
  i.e. keyed by order.  Occurrence = number of earlier units with that id in the page.
* Skipped: chrome (head, header, aside, nav, footer, script, noscript, search/donation
  frames, debug footer), code (``pre``/``code`` and paragraphs of class code,
  codeintable, smathcode, sqlcode), image alt texts.
* Inline variants (``span.switchinline``/``span.switch`` inside a unit, with
  ``<span hidden="true">`` cases of class MAC/WIN/UNIX/WRITER/CALC/... or an id
  starting with ``default``): exactly one case is kept -- ``default``, else UNIX, else
  WIN, else the first non-MAC case (application switches without default); a MAC-only
  switch gives nothing.  Paragraphs inside block-level switches keep their own ids
  and are all kept.
* Text: other inline markup (emph, menuitem, keycode, links) kept as text, ``<br>``
  = space, whitespace runs collapsed, stripped, Unicode NFC.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import html.parser
import json
import os
import shutil
import subprocess
import tempfile
import unicodedata
from typing import Iterable, NamedTuple

PACKAGES = {"de": "libreoffice-help-de", "en-US": "libreoffice-help-en-us",
            "zh-CN": "libreoffice-help-zh-cn"}
LANG_PAIRS = {"de_en": ("de", "en-US"), "zh_en": ("zh-CN", "en-US")}
HELP_DIR = "usr/share/libreoffice/help"
# Whole help modules held out as the test set (~5% of the pairs, chosen by counting).
TEST_MODULES = ("text/schart", "text/sdraw")
DEV_PERCENT = 3  # dev = pages with int(sha1(path), 16) % 100 < DEV_PERCENT, not in test
LONG_CHARS = 400  # pairs with a side longer than this are kept, only counted
SPLITS = ("train", "dev", "test")
REPORT_ORDER = (*(f"{w}_only_in_{s}" for w in ("pages", "units") for s in ("source", "target")),
                "empty_side", "source_equals_target", "duplicate_before_split",
                *(f"{s}_duplicate" for s in ("test", "dev", "train")),
                "dev_overlap_removed", "train_overlap_removed", f"long_gt{LONG_CHARS}_kept")

UNIT_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}
BLOCK_TAGS = UNIT_TAGS | {"div", "ul", "ol", "li", "table", "tbody", "thead", "tr",
                          "td", "th", "pre", "blockquote", "dl", "section", "header",
                          "footer", "aside", "nav"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
             "param", "source", "track", "wbr"}
SKIP_TAGS = {"head", "header", "aside", "footer", "nav", "script", "style", "noscript",
             "title", "button", "label", "pre", "code", "textarea", "select", "svg",
             "iframe", "object"}
SKIP_IDS = {"SearchFrame", "DonationFrame", "DEBUG"}
SKIP_CLASSES = {"bascode", "pycode", "code", "codeintable", "smathcode", "sqlcode"}
CASE_PRIORITY = ("default", "UNIX", "WIN")
NOID = "noid"  # key id of units with neither id nor anchor (notes), keyed by occurrence


class Pair(NamedTuple):
    """One aligned unit: source text, English target text, ``path#id#occurrence``."""
    source: str
    target: str
    key: str


def normalize(text: str) -> str:
    """Return ``text`` with whitespace runs collapsed to one space, stripped, NFC."""
    return unicodedata.normalize("NFC", " ".join(text.split()))


def pick_case(cases: list[tuple[str, str]]) -> str:
    """Return the text of the one variant kept from ``[(case_name, text), ...]``.

    ``default`` wins, then UNIX, then WIN, then the first non-MAC case; "" if none.
    """
    for want in CASE_PRIORITY:
        for name, text in cases:
            if name == want:
                return text
    return next((text for name, text in cases if name != "MAC"), "")


class _Frame:
    """An open element; kind is "unit", "switch", "case" or None."""

    def __init__(self, tag: str, skip: bool):
        self.tag, self.skip, self.kind, self.buf, self.cases = tag, skip, None, [], []
        self.name = self.anchor = self.uid = None


class _UnitParser(html.parser.HTMLParser):
    """Collects ``(key_id, text)`` units of one page in document order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[_Frame] = []
        self.units: list[tuple[str | None, str]] = []
        self.stats: collections.Counter = collections.Counter()

    def _unit(self) -> _Frame | None:
        return next((f for f in reversed(self.stack) if f.kind == "unit"), None)

    def _sink(self) -> list[str] | None:
        """Buffer receiving text now (innermost unit or case), None when ignored."""
        if not self.stack or self.stack[-1].skip:
            return None
        for frame in reversed(self.stack):
            if frame.kind in ("unit", "case"):
                return frame.buf
            if frame.kind == "switch":  # text between cases: whitespace only
                return None
        return None

    def _close(self, frame: _Frame) -> None:
        text = "".join(frame.buf)
        if frame.kind == "unit":
            self.units.append((frame.uid or (f"a:{frame.anchor}" if frame.anchor else NOID),
                               text))
        elif frame.kind == "case":
            parent = self.stack[-1] if self.stack else None
            if parent is not None and parent.kind == "switch":
                parent.cases.append((frame.name, text))
        elif frame.kind == "switch":
            kept = pick_case(frame.cases)
            self.stats["switch_default" if any(n == "default" for n, _ in frame.cases) else
                        "switch_no_default_empty" if not kept else
                        "switch_no_default_fallback"] += 1
            if (sink := self._sink()) is not None:
                sink.append(kept)

    def _pop_through(self, index: int) -> None:
        while len(self.stack) > index:
            self._close(self.stack.pop())

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        unit = self._unit()
        if unit is not None and tag in BLOCK_TAGS:  # a block start implicitly ends p/h*
            self._pop_through(self.stack.index(unit))
            unit = None
        parent = self.stack[-1] if self.stack else None
        skip = bool((parent is not None and parent.skip) or tag in SKIP_TAGS
                    or a.get("id") in SKIP_IDS or classes & SKIP_CLASSES)
        if tag == "a" and a.get("name") and unit is not None and unit.anchor is None:
            unit.anchor = a["name"]
        if tag in VOID_TAGS:
            if tag == "br" and not skip and (sink := self._sink()) is not None:
                sink.append(" ")
            return
        frame = _Frame(tag, skip)
        if tag in UNIT_TAGS and not skip:
            frame.kind, frame.uid = "unit", a.get("id") or None
        elif tag == "span" and unit is not None:
            if classes & {"switchinline", "switch"}:
                frame.kind = "switch"
            elif "hidden" in a and parent is not None and parent.kind == "switch":
                frame.kind = "case"
                frame.name = ("default" if (a.get("id") or "").startswith("default")
                              else (a.get("class") or a.get("id") or "?"))
        self.stack.append(frame)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS and self.stack and self.stack[-1].tag == tag:
            self._close(self.stack.pop())

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i].tag == tag:
                self._pop_through(i)
                return
        self.stats["stray_end_tag"] += 1

    def handle_data(self, data):
        if (sink := self._sink()) is not None:
            sink.append(data)

    def finish(self) -> list[tuple[str | None, str]]:
        self.close()
        self._pop_through(0)
        return self.units


def extract_units(html_text: str, stats: collections.Counter | None = None
                  ) -> list[tuple[str, int, str]]:
    """Return the page's text units as ``[(id, occurrence, normalized_text), ...]``.

    ``occurrence`` counts earlier units with the same id in the page (0 for the
    first).  Units with neither id nor anchor get the id ``NOID`` ("noid"), i.e. they
    are keyed by their order in the page (counted in ``stats`` as ``noid_units``).
    """
    parser = _UnitParser()
    parser.feed(html_text)
    raw = parser.finish()
    seen, out = collections.Counter(), []
    for uid, text in raw:
        if uid == NOID and stats is not None:
            stats["noid_units"] += 1
        out.append((uid, seen[uid], normalize(text)))
        seen[uid] += 1
    if stats is not None:
        stats.update(parser.stats)
    return out


def _sort_key(key: str) -> tuple[str, str, int]:
    path, uid, occ = key.rsplit("#", 2)
    return path, uid, int(occ)


def align(src_pages: dict, tgt_pages: dict, stats: collections.Counter | None = None
          ) -> list[Pair]:
    """Align two languages' pages (``{relpath: html or extract_units() list}``).

    Returns the ``Pair``s whose key occurs on both sides, sorted by key
    (path, id, occurrence), with empty-side and source == target pairs dropped
    (not yet deduplicated).  Drop reasons are counted in ``stats``.
    """
    stats, pairs = collections.Counter() if stats is None else stats, []
    stats["pages_only_in_source"] += len(set(src_pages) - set(tgt_pages))
    stats["pages_only_in_target"] += len(set(tgt_pages) - set(src_pages))
    for path in sorted(set(src_pages) & set(tgt_pages)):
        units = []
        for page in (src_pages[path], tgt_pages[path]):
            page = extract_units(page, stats) if isinstance(page, str) else page
            units.append({(uid, occ): text for uid, occ, text in page})
        src, tgt = units
        stats["units_only_in_source"] += len(src.keys() - tgt.keys())
        stats["units_only_in_target"] += len(tgt.keys() - src.keys())
        for uid, occ in sorted(src.keys() & tgt.keys()):
            s, t = src[uid, occ], tgt[uid, occ]
            if not s or not t:
                stats["empty_side"] += 1
            elif s == t:
                stats["source_equals_target"] += 1
            else:
                pairs.append(Pair(s, t, f"{path}#{uid}#{occ}"))
    pairs.sort(key=lambda p: _sort_key(p.key))
    stats[f"long_gt{LONG_CHARS}_kept"] += sum(
        max(len(p.source), len(p.target)) > LONG_CHARS for p in pairs)
    return pairs


def dedup(pairs: Iterable[Pair]) -> list[Pair]:
    """Return ``pairs`` sorted by key, keeping the first of each (source, target)."""
    seen, out = set(), []
    for p in sorted(pairs, key=lambda p: _sort_key(p.key)):
        if (p.source, p.target) not in seen:
            seen.add((p.source, p.target))
            out.append(p)
    return out


def document_split(path: str, test_modules=TEST_MODULES, dev_percent=DEV_PERCENT) -> str:
    """Return "test" if ``path`` (e.g. ``text/smath/01/x.html``) lies in a test module,
    else "dev" if int(sha1(path), 16) % 100 < dev_percent, else "train"."""
    if any(path == m or path.startswith(m.rstrip("/") + "/") for m in test_modules):
        return "test"
    digest = int(hashlib.sha1(path.encode("utf-8")).hexdigest(), 16)
    return "dev" if digest % 100 < dev_percent else "train"


def split(pairs: Iterable[Pair], test_modules=TEST_MODULES, dev_percent=DEV_PERCENT,
          stats: collections.Counter | None = None) -> dict[str, list[Pair]]:
    """Split by document and return ``{"train": [...], "dev": [...], "test": [...]}``.

    Each pair goes to its page's split (``document_split``); each split is
    deduplicated (first in key order kept); then dev loses pairs whose source or
    target occurs in test, and train loses pairs whose source or target occurs in
    dev or test.  Removals are counted in ``stats``.
    """
    stats = collections.Counter() if stats is None else stats
    by_split: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in pairs:
        by_split[document_split(p.key.split("#", 1)[0], test_modules, dev_percent)].append(p)
    for name in SPLITS:
        before = len(by_split[name])
        by_split[name] = dedup(by_split[name])
        stats[f"{name}_duplicate"] += before - len(by_split[name])
    held_src, held_tgt = set(), set()
    for name in ("test", "dev", "train"):
        kept = [p for p in by_split[name]
                if p.source not in held_src and p.target not in held_tgt]
        stats[f"{name}_overlap_removed"] += len(by_split[name]) - len(kept)
        by_split[name] = kept
        held_src.update(p.source for p in kept)
        held_tgt.update(p.target for p in kept)
    return by_split


def _clean_field(text: str) -> str:
    return text.translate({9: " ", 10: " ", 13: " "})  # tab, LF, CR -> space


def write_tsv(path: str, pairs: Iterable[Pair]) -> int:
    """Write ``source<TAB>target<TAB>key`` lines to gzip file ``path`` (mtime=0, so
    rebuilds are byte-identical).  Returns the number of lines written."""
    n = 0
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                compresslevel=9, mtime=0) as gz:
        for p in pairs:
            gz.write(("\t".join(_clean_field(x) for x in p) + "\n").encode("utf-8"))
            n += 1
    return n


def read_tsv(path: str) -> list[Pair]:
    """Return the ``Pair``s stored in a gzip TSV written by ``write_tsv``."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [Pair(*line.rstrip("\n").split("\t")) for line in f]


def _run(cmd: list[str], what: str, cwd: str | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"{what}: cannot run {cmd[0]!r} ({e})") from e
    if res.returncode != 0:
        raise RuntimeError(f"{what}: `{' '.join(cmd)}` failed with exit code "
                           f"{res.returncode}: {res.stderr.strip()}")
    return res.stdout


def _debs_in(directory: str | None, pkg: str) -> list[str]:
    if not directory or not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.startswith(pkg + "_") and f.endswith(".deb"))


def fetch_debs(workdir: str, debs_dir: str | None = None) -> dict[str, str]:
    """Return ``{package: path to .deb}``, taken from ``debs_dir`` when it holds
    ``<package>_*.deb``, else fetched with ``apt-get download`` into ``workdir``."""
    out = {}
    for pkg in PACKAGES.values():
        found = _debs_in(debs_dir, pkg) or _debs_in(workdir, pkg)
        if not found:
            where = f"{pkg}_*.deb not in --debs {debs_dir}; " if debs_dir else ""
            _run(["apt-get", "download", pkg], f"{where}downloading package {pkg}", workdir)
            found = _debs_in(workdir, pkg)
            if not found:
                raise RuntimeError(f"apt-get download {pkg} produced no {pkg}_*.deb")
        if len(found) > 1:
            raise RuntimeError(f"several .deb files for {pkg}: {found}")
        out[pkg] = found[0]
    return out


def deb_field(deb: str, field: str) -> str:
    """Return control field ``field`` of ``deb`` (``dpkg-deb -f``)."""
    return _run(["dpkg-deb", "-f", deb, field], f"reading {field} of {deb}").strip()


def load_pages(help_dir: str, lang: str) -> dict[str, str]:
    """Return ``{"text/...html": html}`` for ``<help_dir>/<lang>`` (help_dir: the
    unpacked usr/share/libreoffice/help); raises naming a page that is not UTF-8."""
    base = os.path.join(help_dir, lang)
    if not os.path.isdir(os.path.join(base, "text")):
        raise RuntimeError(f"no help pages under {base}/text")
    pages = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(base, "text")):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".html"):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, base).replace(os.sep, "/")
                try:
                    with open(full, encoding="utf-8") as f:
                        pages[rel] = f.read()
                except UnicodeDecodeError as e:
                    raise RuntimeError(f"{full} is not valid UTF-8: {e}") from e
    return pages


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


NOTICE = """\
LibreOffice help parallel corpus (de-en, zh-en)

The files in this directory, {files},
are a derivative work: paragraph text extracted (HTML markup removed, one platform
variant kept, whitespace normalised) from the LibreOffice help pages shipped in these
Debian packages:

{packages}

The LibreOffice help content is Copyright 2000, 2010 Oracle and/or its affiliates and
Copyright (c) 2000, 2010 LibreOffice contributors and/or their affiliates, licensed
under the Mozilla Public License, v. 2.0 (MPL-2.0); some of it incorporates work
licensed to the Apache Software Foundation under the Apache License, Version 2.0 (see
/usr/share/doc/<package>/copyright in those packages).  These files are likewise
distributed under the MPL-2.0:

This Source Code Form is subject to the terms of the Mozilla Public License, v. 2.0. If a copy of the MPL was not distributed with this file, You can obtain one at http://mozilla.org/MPL/2.0/.

Full MPL-2.0 text: https://www.mozilla.org/en-US/MPL/2.0/ (Debian:
/usr/share/common-licenses/MPL-2.0).  Source form: the LibreOffice help sources
(https://git.libreoffice.org/help) and the packages above.  Extraction program:
tasks/corpora/libreoffice.py; MANIFEST.json has the counts and rules.
"""


def main(argv: list[str] | None = None) -> dict:
    """Build the corpus into ``--out``; returns the manifest dict it wrote."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output dir (tasks/data/libreoffice_help)")
    ap.add_argument("--debs", help="dir holding the three libreoffice-help-*.deb files")
    ap.add_argument("--workdir", help="scratch dir (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="lo_help_")
    os.makedirs(workdir, exist_ok=True)
    try:
        debs = fetch_debs(workdir, args.debs)
        packages, pages = {}, {}
        for lang, pkg in PACKAGES.items():
            if deb_field(debs[pkg], "Package") != pkg:
                raise RuntimeError(f"{debs[pkg]} is not package {pkg}")
            packages[pkg] = {"version": deb_field(debs[pkg], "Version"),
                             "deb": os.path.basename(debs[pkg]),
                             "deb_sha256": _sha256(debs[pkg]), "extraction": {}}
            root = os.path.join(workdir, "x", pkg)
            os.makedirs(root, exist_ok=True)
            _run(["dpkg-deb", "-x", debs[pkg], root], f"extracting {debs[pkg]} ({pkg})")
            stats = packages[pkg]["extraction"] = collections.Counter()
            html_pages = load_pages(os.path.join(root, HELP_DIR), lang)
            pages[lang] = {p: extract_units(h, stats) for p, h in html_pages.items()}
            print(f"{pkg} {packages[pkg]['version']}: {len(pages[lang])} pages, "
                  f"{sum(map(len, pages[lang].values()))} units, {dict(stats)}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    os.makedirs(args.out, exist_ok=True)
    manifest = {"source_packages": packages, "pairs": {}, "files": {}, "rules": {
        "units": "p/h1-h6 keyed by (page path, id or a:<first anchor name> or noid, "
                 "occurrence of that id in the page); code paragraphs and chrome skipped",
        "variants": "inline switch: default case, else UNIX, else WIN, else first non-MAC",
        "dropped": "empty side, source == target, exact duplicate (first key kept)",
        "counts": "aligned: pairs (all occurrences) after dropping empty side and "
                  "source == target; unique: after global dedup; train/dev/test: file "
                  "lines (per-split dedup, then overlap removal)",
        "test": f"pages under {list(TEST_MODULES)}",
        "dev": f"other pages with int(sha1(path), 16) % 100 < {DEV_PERCENT}",
        "train": "the rest",
        "leakage": "dev minus pairs sharing source or target with test; "
                   "train minus pairs sharing source or target with dev or test",
        "long": f"pairs with a side > {LONG_CHARS} chars are kept (only counted)"}}
    rows = []
    for name, (sl, tl) in LANG_PAIRS.items():
        stats = collections.Counter()
        pairs = align(pages[sl], pages[tl], stats)
        unique = dedup(pairs)
        stats["duplicate_before_split"] = len(pairs) - len(unique)
        splits = split(pairs, stats=stats)
        counts = {"aligned": len(pairs), "unique": len(unique)}
        for s in SPLITS:
            fname = f"{name}.{s}.tsv.gz"
            counts[s] = write_tsv(os.path.join(args.out, fname), splits[s])
            manifest["files"][fname] = {"lines": counts[s],
                                        "sha256": _sha256(os.path.join(args.out, fname))}
        manifest["pairs"][name] = {"counts": counts, "dropped_or_counted": dict(stats)}
        rows.append((name, counts, stats))
    with open(os.path.join(args.out, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(args.out, "NOTICE"), "w", encoding="utf-8") as f:
        f.write(NOTICE.format(files=", ".join(sorted(manifest["files"])).replace(
            "de_en.train.tsv.gz, ", "de_en.train.tsv.gz,\n"), packages="\n".join(
            f"  {p} {v['version']} ({v['deb']}, sha256 {v['deb_sha256']})"
            for p, v in packages.items())))

    print(f"{'pair':6} {'aligned':>8} {'unique':>7} {'train':>7} {'dev':>6} {'test':>6}")
    for name, c, _ in rows:
        print(f"{name:6} {c['aligned']:8d} {c['unique']:7d} "
              f"{c['train']:7d} {c['dev']:6d} {c['test']:6d}")
    print(f"{'dropped (or counted) units/pairs':34} " + " ".join(f"{n:>7}" for n, _, _ in rows))
    for r in REPORT_ORDER:
        print(f"{r:34} " + " ".join(f"{s[r]:7d}" for _, _, s in rows))
    return manifest


if __name__ == "__main__":
    main()
