"""Deterministic, realistic-looking English text for tests and benchmarks (no downloads).

Words are drawn from a Zipf-like distribution over a few hundred common words followed by a long
tail of made-up ones, with sentence punctuation, capitalisation, numbers, paragraph breaks and a
sprinkle of non-ASCII text, so a tokenizer trained on it learns real merges, sizeable vocabularies
are reachable and the byte fallback gets exercised.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator

_WORDS = """the of and to in a is that for it as was with be by on not he this are or his from at which
but have an they you were her she there all one their would we him been has when who will more no if out
so said what up its about into than them can only other new some could time these two may then do first
any my now such like our over man me even most made after also did many before must through back years
where much your way well down should because each just those people how too little state good very make
world still own see men work long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take three states himself few house
use during without again place american around however home small found thought went say part once general
high upon school every don does got united left number course war until always away something fact though
water less public put think almost hand enough far took head yet government system better set told nothing
night end why called didn eyes find going look asked later knew point next program city business give group
toward young days let room president side social given present several order national possible rather second
face per among form important often things looked early white case john become large big need four within
felt along children saw best church ever least power development light thing seemed family interest want
members mind country area others done turned although open god service problem certain kind different
thus began door help sense means whole matter perhaps itself york times law human line above name example
action company hands local show whether five history gave today either act feet across taken past quite
anything having seen death experience body word half really field week car words already information tell
together college shall money period held keep sure free real probably seems political cannot question
behind coming data model training tokens layer expert attention router mixture gradient parallel""".split()

_EXTRAS = ["café", "naïve", "Zürich", "東京", "façade", "résumé", "Ελλάδα", "déjà vu", "€5", "π ≈ 3.14159"]
_SYLLABLES = """ka ro mi ten sha lo ver ix pa dre nu gal o e is an tor bel qui zo mar en lin ph cy str ad
ous ment tion al ble ing ter con pro ex un re de im sub ul ta ni se""".split()


def _pseudo_words(count: int, seed: int = 12345) -> list[str]:
    """A fixed lexicon of made-up words (2-4 syllables): the long tail real text has and a short list lacks."""
    rng = random.Random(seed)
    return ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(count)]


# Ranks: the common words first, then 20,000 rarer ones; frequency ~ 1/rank (Zipf).
_LEXICON = _WORDS + _pseudo_words(20_000)
_CUM_WEIGHTS = list(itertools.accumulate(1.0 / (rank + 1) ** 1.07 for rank in range(len(_LEXICON))))


def _sentence(rng: random.Random) -> str:
    """One sentence: 5-24 Zipf-drawn words, maybe a number, comma, non-ASCII word; capitalised, punctuated."""
    words = rng.choices(_LEXICON, cum_weights=_CUM_WEIGHTS, k=rng.randint(5, 24))
    if rng.random() < 0.25:
        words.insert(rng.randrange(len(words)), str(rng.choice([rng.randint(0, 100), rng.randint(1900, 2030)])))
    if rng.random() < 0.05:
        words.insert(rng.randrange(len(words)), rng.choice(_EXTRAS))
    if len(words) > 8 and rng.random() < 0.4:
        words[rng.randrange(2, len(words) - 2)] += ","
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", ".", "?", "!"])


def synthetic_document(rng: random.Random, max_paragraphs: int = 3) -> str:
    """One document: 1..max_paragraphs paragraphs of 1-6 sentences, separated by blank lines."""
    paragraphs = [
        " ".join(_sentence(rng) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, max_paragraphs))
    ]
    return "\n\n".join(paragraphs)


def synthetic_documents(count: int, seed: int = 0, max_paragraphs: int = 3) -> Iterator[str]:
    """``count`` documents, the same ones for the same ``seed``."""
    rng = random.Random(seed)
    for _ in range(count):
        yield synthetic_document(rng, max_paragraphs)


def write_synthetic_jsonl(path: str, target_bytes: int, seed: int = 0, key: str = "text") -> int:
    """Write documents as JSONL (``{key: text}`` per line) until the file holds ``target_bytes``; returns lines."""
    rng = random.Random(seed)
    written = lines = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            line = json.dumps({key: synthetic_document(rng)}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            lines += 1
    return lines
