"""The demo's corpora (examples/bam_demo/corpora.py): four domains from files on the machine, deterministic."""

import json
import re
import sys

import pytest

from tests.support import paths

sys.path.insert(0, paths.EXAMPLES)

from bam_demo import bio  # noqa: E402
from bam_demo import corpora as demo_corpora  # noqa: E402


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpora")
    return demo_corpora.build_corpora(str(out))


def _docs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_four_nonempty_domains_of_valid_jsonl(corpora):
    assert sorted(corpora) == sorted(demo_corpora.DOMAINS)
    for name, path in corpora.items():
        records = _docs(path)
        assert len(records) > 100, name
        for record in records:
            assert isinstance(record, dict) and isinstance(record["text"], str), name
            assert record["text"].strip(), name


def test_domain_and_document_sizes_within_bounds(corpora):
    for name, path in corpora.items():
        texts = [r["text"] for r in _docs(path)]
        sizes = [len(t.encode("utf-8")) for t in texts]
        total = sum(sizes)
        assert (
            demo_corpora.MIN_DOMAIN_BYTES <= total <= demo_corpora.DEFAULT_DOMAIN_BYTES + demo_corpora.DOC_MAX_BYTES
        ), name
        assert max(sizes) <= demo_corpora.DOC_MAX_BYTES, name
        assert sorted(sizes)[len(sizes) // 2] >= demo_corpora.DOC_MIN_BYTES, name  # most documents are 1-2 KB


def test_deterministic_across_calls(corpora, tmp_path):
    again = demo_corpora.build_corpora(str(tmp_path))
    for name in demo_corpora.DOMAINS:
        with open(corpora[name], "rb") as a, open(again[name], "rb") as b:
            assert a.read() == b.read(), name


def test_domains_differ_in_content(corpora):
    first = {name: _docs(path)[0]["text"] for name, path in corpora.items()}
    assert len(set(first.values())) == 4
    code = " ".join(r["text"] for r in _docs(corpora["code"])[:50])
    law = " ".join(r["text"] for r in _docs(corpora["law"])[:50]).lower()
    assert "def " in code and "import " in code
    assert "license" in law or "warranty" in law


def test_synthetic_math_is_correct():
    docs = demo_corpora.math_documents(20_000)
    text = "\n".join(docs)
    sums = re.findall(r"Therefore (\d+) \+ (\d+) = (\d+)\.", text)
    products = re.findall(r"Check: (\d+) / (\d+) = (\d+), so the product is (\d+)\.", text)
    assert sums or products
    for a, b, c in sums:
        assert int(a) + int(b) == int(c)
    for p, b, a, p2 in products:
        assert int(a) * int(b) == int(p) == int(p2)
    assert demo_corpora.math_documents(20_000) == docs


def test_split_documents_bounds():
    text = "\n\n".join(f"paragraph {i} " + "word " * (i * 37 % 300) for i in range(200))
    text += "\n\n" + "x" * 5000  # one line longer than a document
    docs = demo_corpora.split_documents(text)
    assert all(len(d.encode()) <= demo_corpora.DOC_MAX_BYTES for d in docs)
    assert "".join(docs).replace("\n", "").count("x") == 5000


def test_synthetic_genes_translate_to_what_their_records_say():
    docs = bio.bio_documents(20_000)
    assert docs == bio.bio_documents(20_000)  # deterministic
    assert all(demo_corpora.DOC_MIN_BYTES <= len(d) <= demo_corpora.DOC_MAX_BYTES for d in docs[:-1])
    for record in "\n\n".join(docs).split("\n\n"):
        lines = record.splitlines()
        dna = "".join(lines[1:-2])
        protein = lines[-2].removeprefix("translation: ")
        assert protein == bio.translate(dna) and protein.startswith("M") and protein.endswith("*")
        assert protein.count("*") == 1 and f"| {len(dna)} bp | {len(protein) - 1} aa" in lines[0]
        assert lines[-1] == f"GC content: {100 * sum(b in 'GC' for b in dna) / len(dna):.1f}%"
    assert bio.translate("ATGTGGTAA") == "MW*"  # the standard code, by hand
