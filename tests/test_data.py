"""Bundled Wikipedia data, its builder's wikitext cleaning, and calibration windows."""
import bz2
import json

import datasets
import pytest
import torch

from flatquant_lab import wikidata
from flatquant_lab.data import bundled_data_path, calibration_ids, concat_token_ids, load_texts


def _read(split):
    with open(bundled_data_path(split), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_bundled_split_is_by_article_and_disjoint():
    calib, ev = _read("calib"), _read("eval")
    assert (len(calib), len(ev)) == (wikidata.N_PAGES - wikidata.N_EVAL, wikidata.N_EVAL) == (101, 5)
    titles_c, titles_e = {d["title"] for d in calib}, {d["title"] for d in ev}
    assert len(titles_c) == 101 and len(titles_e) == 5 and not titles_c & titles_e
    for d in calib + ev:
        assert set(d) == {"title", "text"} and d["text"].strip()
        # No markup left behind by the cleaner.
        for junk in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''", "[http", "Category:"):
            assert junk not in d["text"], (d["title"], junk)


def test_bundled_sizes(tokenizer):
    calib, ev = _read("calib"), _read("eval")
    # Characters for the big split (about 4.5 characters per token here), real tokens for the small one.
    assert sum(len(d["text"]) for d in calib) >= 600_000
    n_eval = sum(len(ids) for ids in tokenizer([d["text"] for d in ev], add_special_tokens=False)["input_ids"])
    assert n_eval >= 20_000


def test_bundled_data_path_errors():
    assert bundled_data_path("calib").name == "wiki_calib.jsonl"
    with pytest.raises(ValueError, match="split"):
        bundled_data_path("train")


WIKITEXT = """{{Use dmy dates|date=June 2013}}{{Infobox thing | name = {{nested|x}} | y = 1}}
'''Foo''' is a [[bar (thing)|bar]] in [[Baz]].<ref name="a">{{cite web|url=http://x}}</ref> It is ''old''.<ref>Ref.</ref>
Second line of the same paragraph.<!-- hidden -->

[[File:Foo.jpg|thumb|A [[caption]] here]]
{| class="wikitable"
| cell || cell
|}
== History ==
Founded in [[1900]] by [http://example.org Jane Doe]&nbsp;and others.
* First item
* Second [[item|entry]]

== References ==
{{reflist}}
* Some citation, 1999.
=== Sub of references ===
Still dropped.
== Legacy ==
Kept again.
[[Category:Things]]
[[fr:Foo]]
"""


def test_clean_wikitext():
    text = wikidata.clean_wikitext(WIKITEXT)
    assert text.split("\n\n") == [
        "Foo is a bar in Baz. It is old. Second line of the same paragraph.",
        "History",
        "Founded in 1900 by Jane Doe and others.",
        "First item\nSecond entry",
        "Legacy",
        "Kept again.",
    ]


def test_parse_pages_keeps_articles_only():
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>A</title><ns>0</ns><revision><text>Alpha text.</text></revision></page>
<page><title>R</title><ns>0</ns><redirect title="A" /><revision><text>#REDIRECT [[A]]</text></revision></page>
<page><title>Wikipedia:P</title><ns>4</ns><revision><text>Project.</text></revision></page>
<page><title>B</title><ns>0</ns><revision><text>Beta &amp;amp; text.</text></revision></page>
</mediawiki>"""
    pages = wikidata.parse_pages(bz2.compress(xml.encode()))
    assert [p["title"] for p in pages] == ["A", "B"]
    assert wikidata.clean_wikitext(pages[1]["wikitext"]) == "Beta & text."


def test_write_jsonl_atomic(tmp_path):
    path = tmp_path / "x.jsonl"
    wikidata.write_jsonl(path, [{"title": "T", "text": "é"}])
    assert json.loads(path.read_text(encoding="utf-8")) == {"title": "T", "text": "é"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_calibration_ids_deterministic_and_shaped(tokenizer):
    path = bundled_data_path("eval")
    a = calibration_ids(path, tokenizer, n_samples=4, seqlen=64, seed=0)
    b = calibration_ids(path, tokenizer, n_samples=4, seqlen=64, seed=0)
    c = calibration_ids(path, tokenizer, n_samples=4, seqlen=64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Each window is a contiguous slice of the EOS-joined documents.
    flat = concat_token_ids(load_texts(path), tokenizer)
    row = a[0].tolist()
    starts = (flat == row[0]).nonzero().flatten().tolist()
    assert any(flat[s:s + 64].tolist() == row for s in starts)


def test_calibration_ids_sources_agree(tokenizer, tmp_path):
    docs = [f"Document number {i} talks about topic {i * 7}. " * 20 for i in range(5)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"title": str(i), "text": t}) + "\n" for i, t in enumerate(docs)))
    ds = datasets.Dataset.from_dict({"text": docs})
    ref = calibration_ids(docs, tokenizer, n_samples=3, seqlen=32, seed=5)
    assert torch.equal(calibration_ids(path, tokenizer, 3, 32, seed=5), ref)
    assert torch.equal(calibration_ids(ds, tokenizer, 3, 32, seed=5), ref)
    txt = tmp_path / "d.txt"
    txt.write_text(docs[0])
    assert calibration_ids(txt, tokenizer, 2, 16).shape == (2, 16)


def test_calibration_ids_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="seqlen"):
        calibration_ids(["too short"], tokenizer, n_samples=1, seqlen=512)
    with pytest.raises(ValueError, match="n_samples"):
        calibration_ids(["some text"], tokenizer, n_samples=0, seqlen=2)
    with pytest.raises(FileNotFoundError, match="source"):
        calibration_ids(tmp_path / "missing.jsonl", tokenizer, 1, 2)
    with pytest.raises(TypeError, match="source"):
        calibration_ids(42, tokenizer, 1, 2)
    with pytest.raises(ValueError, match="text"):
        calibration_ids(datasets.Dataset.from_dict({"a": [1], "b": [2]}), tokenizer, 1, 2)


def test_clean_wikitext_headings():
    text = wikidata.clean_wikitext(
        "Intro.\n== Alpha ==\n=== Alpha one ===\nBody.\n== Beta ==\n{{only a template}}\n== Gamma ==\nEnd.")
    assert text.split("\n\n") == ["Intro.", "Alpha", "Alpha one", "Body.", "Gamma", "End."]
