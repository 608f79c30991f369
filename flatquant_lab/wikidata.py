"""Build the bundled Wikipedia text data (``flatquant-lab build-data``; ``make data``).

Source: the 106 English Wikipedia articles in gensim 4.4.0's test data
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
a MediaWiki XML dump excerpt: 206 pages, of which 100 are redirects). The file is read from an
importable gensim if there is one, otherwise from the gensim wheel fetched with
``pip download --no-deps`` into a temporary folder (only the bz2 member is read; gensim is never
installed into the project's environment).

Each article's wikitext is turned into plain prose here (no gensim code): templates, tables,
references, comments, files/images, categories, interlanguage links, HTML tags and the
reference-only sections (References, External links, See also, ...) are dropped; links keep their
label; headings and list items stay as lines of their own; paragraphs are separated by a blank
line. In page order, the 5 articles after the first 74 (the first of the held-out pages of
docs/results.md, 'The first exploration', together just over 20,000 tokens) go to ``wiki_eval.jsonl`` and the
other 101 to ``wiki_calib.jsonl`` (one ``{"title", "text"}`` object per line). The evaluation set is kept near
the 20,000-token floor because every method of the main job is evaluated on all of it, on a CPU. The files live in the package
(``flatquant_lab/eval/tasks/wiki_fq/``), their single copy, so that the lm-eval tasks find them wherever the
package is installed; ``flatquant_lab.data.bundled_data_path`` returns their paths.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import io
import json
import logging
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from .files import atomic_write_text

log = logging.getLogger(__name__)

GENSIM_REQUIREMENT = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
# Any gensim 4.4.0 wheel holds the same data file; naming one makes `pip download` work on any host.
WHEEL_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp")

N_PAGES = 106
EVAL_START = 74  # the first exploration (docs/results.md) held out the pages after the first 74
N_EVAL = 5  # articles 75-79 in page order: 25k tokens, the first of those held-out pages to pass 20k
MIN_TOKENS = {"calib": 100_000, "eval": 20_000}
DATA_DIR = Path(__file__).resolve().parent / "eval" / "tasks" / "wiki_fq"

# Sections that hold only citations, link lists or navigation: dropped with everything under them.
DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "gallery", "works cited", "primary sources", "secondary sources", "external link",
    "related articles", "links", "notes and citations", "explanatory notes", "reference",
}
# Namespaces whose links are not prose: the whole link goes.
DROP_LINK_PREFIXES = {"file", "image", "category", "media", "template", "special", "user", "talk"}
# Tags whose content is not prose (formulas, galleries, code, ...): dropped with their content.
DROP_TAGS = ("ref", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source",
             "templatedata", "graph", "mapframe", "chem", "ce", "hiero", "table", "references")


# ----------------------------------------------------------------------------------------- source
def read_source_bz2() -> bytes:
    """The bz2 dump excerpt, from an importable gensim or a downloaded gensim wheel (checked by hash)."""
    data = _from_installed_gensim()
    if data is None:
        data = _from_wheel()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256:
        raise RuntimeError(f"{MEMBER}: sha256 {digest} differs from the expected {MEMBER_SHA256}")
    return data


def _from_installed_gensim() -> bytes | None:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.parent / MEMBER
    if not path.is_file():
        return None
    log.info("reading %s from the installed gensim", path)
    return path.read_bytes()


def _from_wheel() -> bytes:
    with tempfile.TemporaryDirectory(prefix="fq-gensim-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
               "--only-binary=:all:", *WHEEL_PLATFORM, "-d", tmp, GENSIM_REQUIREMENT]
        log.info("fetching the %s wheel (data only): %s", GENSIM_REQUIREMENT, " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("gensim-*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {GENSIM_REQUIREMENT} with pip download (needs the package registry): "
                f"{res.stderr.strip()[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            return zf.read(MEMBER)


def parse_pages(bz2_bytes: bytes) -> list[dict]:
    """Articles of the dump, in page order: namespace 0, not redirects, as ``{"title", "wikitext"}``."""
    pages = []
    for _, elem in ET.iterparse(io.BytesIO(bz2.decompress(bz2_bytes)), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        text = next((c.text for c in elem.iter() if c.tag.rsplit("}", 1)[-1] == "text"), None) or ""
        if fields["ns"].text == "0" and "redirect" not in fields:
            pages.append({"title": fields["title"].text, "wikitext": text})
        elem.clear()
    return pages


# -------------------------------------------------------------------------------------- wikitext
def _strip_balanced(text: str, open_: str, close: str, keep=None) -> str:
    """Remove (or replace through ``keep(inner)``) balanced ``open_ ... close`` spans, nested ones too."""
    out, depth, start, i, n = [], 0, 0, 0, len(text)
    stack = []
    while i < n:
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
            stack.append(i + len(open_))
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            inner_start = stack.pop()
            depth -= 1
            i += len(close)
            if depth == 0:
                if keep is not None:
                    out.append(keep(text[inner_start:i - len(close)]))
                start = i
        else:
            i += 1
    # An unclosed opener (broken markup) drops the rest of the page rather than leaking markup.
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _strip_tables(text: str) -> str:
    """Drop ``{| ... |}`` tables (line-based, nested)."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
            continue
        if depth:
            if s.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def _link(inner: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; non-prose namespaces -> nothing."""
    target, _, label = inner.partition("|")
    prefix, colon, _ = target.partition(":")
    p = prefix.strip().lower()
    if colon and (p in DROP_LINK_PREFIXES or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", p) and not label):
        return ""  # files, categories, interlanguage links ([[fr:...]])
    if label:
        # File captions may hold more pipes; for ordinary links the last field is the label.
        return label.rsplit("|", 1)[-1]
    target = target.lstrip(":")
    if colon and p in ("wikt", "wiktionary", "w", "wikipedia", "wp", "s", "wikisource", "commons"):
        target = target.partition(":")[2]
    return target.split("#", 1)[0] or target.lstrip("#")


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: paragraphs kept, markup, refs, tables and templates gone."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    for tag in DROP_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.I)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.I | re.S)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining tags (small, sup, div, span...): keep content
    text = _strip_balanced(text, "{{", "}}")
    text = _strip_tables(text)
    text = _strip_balanced(text, "[[", "]]", keep=_link)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and friends
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = html.unescape(text).replace("\xa0", " ")
    return _layout(text)


def _layout(text: str) -> str:
    """Headings and list items as lines, paragraphs as blocks; drop reference-only sections."""
    blocks, para, items, drop_level = [], [], [], 0

    def flush():
        # A paragraph's lines join with spaces (as MediaWiki renders them); a run of list items
        # stays one block with one item per line.
        if para:
            blocks.append((0, " ".join(para)))
            para.clear()
        if items:
            blocks.append((0, "\n".join(items)))
            items.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        head = re.fullmatch(r"(={1,6})\s*(.*?)\s*\1", line)
        if head:
            level, title = len(head.group(1)), head.group(2).strip(" =:")
            flush()
            if drop_level and level > drop_level:
                continue
            drop_level = level if title.lower() in DROP_SECTIONS else 0
            if not drop_level and title:
                blocks.append((level, title))
            continue
        if drop_level:
            continue
        if not line:
            flush()
            continue
        if line[0] in "*#:;":
            if para:
                flush()
            item = _tidy(line.lstrip("*#:; "))
            if _is_prose(item):
                items.append(item)
            continue
        if line.startswith(("|", "!")):  # table rows left by broken table markup
            continue
        item = _tidy(line)
        if item:
            if items:
                flush()
            para.append(item)
    flush()
    # Blocks are (heading level, text), level 0 for body text.
    blocks = [(lv, t) for lv, t in ((lv, "\n".join(_tidy(x) for x in b.split("\n"))) for lv, b in blocks)
              if _is_prose(t)]
    return "\n\n".join(t for i, (lv, t) in enumerate(blocks) if not lv or _has_body(blocks, i))


def _has_body(blocks: list, i: int) -> bool:
    """Whether heading ``i`` has body text before the next heading of its level or above
    (a section whose body was all templates or tables loses its heading too)."""
    level = blocks[i][0]
    for lv, _ in blocks[i + 1:]:
        if lv == 0:
            return True
        if lv <= level:
            return False
    return False


def _tidy(s: str) -> str:
    """Spacing and punctuation left behind by removed templates, refs and links."""
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r"\(\s*[,;:]?\s*\)", "", s)  # "()" or "(; )" left by removed templates
    s = re.sub(r"\(\s*[,;]\s*", "(", s)
    s = re.sub(r"\s*[,;]\s*\)", ")", s)
    s = re.sub(r"\s+([,.;:!?)])", r"\1", s)
    s = re.sub(r"([(])\s+", r"\1", s)
    s = re.sub(r"([,;])(?:\s*[,;])+", r"\1", s)
    return s.strip()


def _is_prose(s: str) -> bool:
    # At least one word of letters; drops lines reduced to punctuation, numbers or stray markup.
    return bool(s) and re.search(r"[A-Za-z]{2,}", s) is not None and not s.startswith(("{", "}", "|"))


# ------------------------------------------------------------------------------------------ build
def build_documents(bz2_bytes: bytes | None = None) -> list[dict]:
    """All 106 articles as ``{"title", "text"}`` in page order."""
    pages = parse_pages(read_source_bz2() if bz2_bytes is None else bz2_bytes)
    if len(pages) != N_PAGES:
        raise RuntimeError(f"{MEMBER}: expected {N_PAGES} articles, found {len(pages)}")
    docs = [{"title": p["title"], "text": clean_wikitext(p["wikitext"])} for p in pages]
    empty = [d["title"] for d in docs if not d["text"]]
    if empty:
        raise RuntimeError(f"articles with no text left after cleaning: {empty}")
    return docs


def jsonl_text(docs: list[dict]) -> str:
    """One JSON object (title, text) per line."""
    return "".join(json.dumps({"title": d["title"], "text": d["text"]}, ensure_ascii=False) + "\n" for d in docs)


def write_jsonl(path: Path, docs: list[dict]) -> None:
    """Write one JSON object per line, atomically (temp file in the same folder, then rename)."""
    atomic_write_text(path, jsonl_text(docs))


def count_tokens(docs: list[dict], tokenizer) -> int:
    return sum(len(ids) for ids in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"])


def build(out_dir: Path = DATA_DIR, eval_start: int = EVAL_START, n_eval: int = N_EVAL, tokenizer=None) -> dict:
    """Rebuild ``wiki_calib.jsonl`` / ``wiki_eval.jsonl`` in ``out_dir``; return the counts.

    Articles ``eval_start .. eval_start + n_eval - 1`` (page order) are the evaluation set, all
    others the calibration set: split by article, so no text is in both.
    """
    docs = build_documents()
    if not 0 <= eval_start < len(docs):
        raise ValueError(f"eval_start: expected 0..{len(docs) - 1}, got {eval_start}")
    if not 0 < n_eval < len(docs) - eval_start:
        raise ValueError(f"n_eval: expected 1..{len(docs) - eval_start - 1} articles for evaluation, got {n_eval}")
    stop = eval_start + n_eval
    splits = {"calib": docs[:eval_start] + docs[stop:], "eval": docs[eval_start:stop]}
    stats = {}
    for name, part in splits.items():
        stats[name] = {"pages": len(part), "chars": sum(len(d["text"]) for d in part),
                       "words": sum(len(d["text"].split()) for d in part)}
        if tokenizer is not None:
            stats[name]["tokens"] = count_tokens(part, tokenizer)
            if stats[name]["tokens"] < MIN_TOKENS[name]:
                raise RuntimeError(
                    f"{name} split has {stats[name]['tokens']} tokens, fewer than the {MIN_TOKENS[name]} needed"
                )
    # Both files serialized before either is replaced, so a failure cannot leave one new and one old.
    texts = {name: jsonl_text(part) for name, part in splits.items()}
    for name, text in texts.items():
        atomic_write_text(Path(out_dir) / f"wiki_{name}.jsonl", text)
    return stats
