"""Corpora for the CPU demo (``examples/bam_demo/``): four domains of text, nothing downloaded.

    python examples/bam_demo/corpora.py --output-dir runs/demo/data    # general/code/law/math.jsonl

Every domain is written as JSONL, one ``{"text": ...}`` document of about 1-2 KB per line, about
``--domain-bytes`` (default 400 KB) of text per domain, in an order fixed by the sources and a fixed
seed, so the same machine always gives byte-identical files. Held-out text is left to training's
``--split`` (its valid part is a contiguous range of these documents); the documents of a domain
are shuffled with a fixed seed so that range is a fair sample of the domain.

Sources (present on every Debian machine with CPython):

- ``general``: English prose documentation: the Python reference and library topics that ``pydoc``
  ships in the running interpreter's standard library (``pydoc_data/topics.py``).
- ``code``: Python source: the ``.py`` files of that standard library (tests, ``pydoc_data``,
  ``site-packages`` and generated tables excluded), at most a few KB from each file, files taken in
  an order fixed by a hash of their path so that many modules are represented.
- ``law``: license texts: ``/usr/share/common-licenses/*`` (Debian's ``base-files``), CPython's
  ``LICENSE.txt``, then the license paragraphs of ``/usr/share/doc/*/copyright`` (packaging metadata
  fields dropped, paragraphs seen before dropped, so the many copies of the GPL count once). The
  first two alone give about 200 KB; the copyright files of the installed packages give the rest.
- ``math``: **synthetic**. A Debian + CPython machine holds no mathematical prose to speak of, so
  this domain is generated deterministically (``random.Random`` with a fixed seed) from templates:
  worked solutions (column addition, long multiplication, linear equations and systems, quadratic
  equations by factoring, Euclid's algorithm, fractions, prime factorisation, modular powers,
  derivatives and definite integrals of polynomials, arithmetic series), definitions, and short
  classical proofs (induction, irrationality of sqrt 2, infinitude of primes) with checked instances.
  Every number in it is computed, so every statement is true.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from math import gcd
from typing import Optional

DOMAINS = ("general", "code", "law", "math")
DEFAULT_DOMAIN_BYTES = 400_000  # of text per domain
MIN_DOMAIN_BYTES = 150_000  # a domain with less real text than this is refused
DOC_MIN_BYTES, DOC_MAX_BYTES = 1000, 2000
SHUFFLE_SEED = 1234
CODE_BYTES_PER_FILE = 6000
MATH_SEED = 31415


class CorpusError(RuntimeError):
    """A domain's sources are missing or too small on this machine."""


# ---------------------------------------------------------------------------------------------
# splitting text into documents


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _pieces(text: str, max_bytes: int) -> Iterable[str]:
    """Paragraphs (blank-line separated), each cut at line (then character) boundaries to fit."""
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if _nbytes(paragraph) <= max_bytes:
            yield paragraph
            continue
        chunk: list[str] = []
        size = 0
        for line in paragraph.split("\n"):
            while _nbytes(line) > max_bytes:  # a very long line: cut it (rare)
                head, line = line[: max_bytes // 2], line[max_bytes // 2 :]
                if chunk:
                    yield "\n".join(chunk)
                    chunk, size = [], 0
                yield head
            if chunk and size + _nbytes(line) + 1 > max_bytes:
                yield "\n".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += _nbytes(line) + 1
        if chunk:
            yield "\n".join(chunk)


def split_documents(text: str, min_bytes: int = DOC_MIN_BYTES, max_bytes: int = DOC_MAX_BYTES) -> list[str]:
    """Cut ``text`` into documents of about ``min_bytes``..``max_bytes`` at paragraph boundaries.

    A document is closed once it reaches ``min_bytes``; no document exceeds ``max_bytes`` (a short
    tail is merged into the previous document when that keeps it within bounds).
    """
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for piece in _pieces(text, max_bytes):
        n = _nbytes(piece)
        if current and size + n + 2 > max_bytes:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(piece)
        size += n + 2
        if size >= min_bytes:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        tail = "\n\n".join(current)
        if docs and _nbytes(docs[-1]) + _nbytes(tail) + 2 <= max_bytes:
            docs[-1] = docs[-1] + "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def _take(sources: Iterable[str], target_bytes: int) -> list[str]:
    """Documents from ``sources`` (texts, in order) until ``target_bytes`` of text are collected."""
    docs: list[str] = []
    total = 0
    for text in sources:
        for doc in split_documents(text):
            if total >= target_bytes:
                return docs
            docs.append(doc)
            total += _nbytes(doc)
    return docs


def _stable_key(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# general: pydoc's documentation topics


def _stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


def general_sources() -> Iterable[str]:
    """The documentation topics of the running interpreter's ``pydoc_data``, in key order."""
    path = os.path.join(_stdlib(), "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        raise CorpusError(f"general: {path} not found (CPython's pydoc_data)")
    namespace: dict = {}
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), namespace)  # a module holding one dict literal
    topics = namespace["topics"]
    for key in sorted(topics):
        yield topics[key]


# ---------------------------------------------------------------------------------------------
# code: the standard library's Python files

_CODE_EXCLUDE = re.compile(
    r"(^|/)(test|tests|idle_test|site-packages|dist-packages|pydoc_data|__pycache__|lib2to3|encodings)(/|$)"
    r"|(^|/)(test_[^/]*|_pydecimal_data[^/]*|unicodedata[^/]*|_aix_support)\.py$"
)


def code_sources() -> Iterable[str]:
    """Standard-library ``.py`` files in an order fixed by a hash of their relative path."""
    root = _stdlib()
    files = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if _CODE_EXCLUDE.search(rel) or os.path.getsize(path) < 2000:
            continue
        files.append(rel)
    if not files:
        raise CorpusError(f"code: no Python files under {root}")
    for rel in sorted(files, key=_stable_key):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        # at most CODE_BYTES_PER_FILE from each file, cut at a line boundary
        if len(text) > CODE_BYTES_PER_FILE:
            text = text[: text.rfind("\n", 0, CODE_BYTES_PER_FILE) + 1]
        yield text


# ---------------------------------------------------------------------------------------------
# law: license texts

_DEP5_FIELD = re.compile(
    r"^(Format|Upstream-Name|Upstream-Contact|Source|Files|Copyright|Comment|Disclaimer"
    r"|Upstream-Author|Debianized-By|Debianized-Date|Original-Source-Location):",
    re.I,
)


def _license_paragraphs(text: str) -> Iterable[str]:
    """Prose paragraphs of a license or Debian copyright file (DEP-5 metadata fields dropped)."""
    text = text.replace("\r\n", "\n").replace("\f", "\n")
    for paragraph in re.split(r"\n[ \t]*\n", text):
        lines = paragraph.split("\n")
        if any(_DEP5_FIELD.match(line) for line in lines):
            continue
        # DEP-5 continuation lines: one leading space; ' .' is an empty line
        if all(line.startswith(" ") or not line.strip() or line.startswith("License:") for line in lines):
            lines = ["" if line.strip() == "." else line[1:] if line.startswith(" ") else line for line in lines]
            lines = [line for line in lines if not line.startswith("License:")]
        paragraph = "\n".join(lines).strip("\n")
        if len(re.findall(r"[A-Za-z]", paragraph)) >= 80:  # prose, not a list of names and years
            yield paragraph


def law_files() -> list[str]:
    """Files the law domain reads, in order: common licenses, CPython's license, copyright files."""
    files: list[str] = []
    seen: set[str] = set()
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        real = os.path.realpath(path)
        if os.path.isfile(real) and real not in seen:
            seen.add(real)
            files.append(real)
    cpython = os.path.join(_stdlib(), "LICENSE.txt")
    if os.path.isfile(cpython):
        files.append(cpython)
    copyrights = [p for p in glob.glob("/usr/share/doc/*/copyright") if os.path.isfile(p)]
    files += sorted(copyrights, key=lambda p: _stable_key(os.path.basename(os.path.dirname(p))))
    return files


def law_sources() -> Iterable[str]:
    """License texts, each paragraph once across the whole domain."""
    seen: set[str] = set()
    for path in law_files():
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        kept = []
        for paragraph in _license_paragraphs(text):
            key = " ".join(paragraph.split()).lower()
            if key not in seen:
                seen.add(key)
                kept.append(paragraph)
        if kept:
            yield "\n\n".join(kept)


# ---------------------------------------------------------------------------------------------
# math: synthetic worked solutions, definitions and proofs


def _sign_term(c: int, var: str = "", first: bool = False) -> str:
    body = f"{abs(c)}{var}" if (abs(c) != 1 or not var) else var
    if first:
        return ("-" if c < 0 else "") + body
    return (" - " if c < 0 else " + ") + body


def _poly(coeffs: Sequence[int], var: str = "x") -> str:
    """coeffs[i] is the coefficient of var**i; printed highest degree first."""
    terms = []
    for power in range(len(coeffs) - 1, -1, -1):
        c = coeffs[power]
        if c == 0:
            continue
        v = "" if power == 0 else var if power == 1 else f"{var}^{power}"
        terms.append(_sign_term(c, v, first=not terms))
    return "".join(terms) or "0"


def _frac(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _m_addition(r: random.Random) -> str:
    a, b = r.randint(1000, 99999), r.randint(1000, 99999)
    da, db = str(a)[::-1], str(b)[::-1]
    lines = [f"Problem. Compute {a} + {b}.", "Solution. Add the columns from the right, carrying tens."]
    carry, names = 0, ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(
            f"{names[i].capitalize()}: {x} + {y}"
            + (f" + {carry}" if carry else "")
            + f" = {s}, write {s % 10}"
            + (f", carry {s // 10}." if s >= 10 else ".")
        )
        carry = s // 10
    if carry:
        lines.append(f"Write the final carry {carry}.")
    lines.append(f"Therefore {a} + {b} = {a + b}.")
    return "\n".join(lines)


def _m_multiplication(r: random.Random) -> str:
    a, b = r.randint(12, 999), r.randint(12, 99)
    tens, ones = b // 10 * 10, b % 10
    return (
        f"Problem. Compute {a} x {b}.\n"
        f"Solution. Write {b} = {tens} + {ones} and use the distributive law:\n"
        f"{a} x {b} = {a} x {tens} + {a} x {ones} = {a * tens} + {a * ones} = {a * b}.\n"
        f"Check: {a * b} / {b} = {a}, so the product is {a * b}."
    )


def _m_linear(r: random.Random) -> str:
    a = r.choice([n for n in range(-12, 13) if n not in (0, 1)])
    x, b = r.randint(-20, 20), r.randint(-50, 50)
    c = a * x + b
    return (
        f"Problem. Solve {_poly([b, a])} = {c} for x.\n"
        f"Solution. Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}.\n"
        f"Divide both sides by {a}: x = {c - b} / {a} = {x}.\n"
        f"Check: {a} * ({x}) + ({b}) = {a * x} + ({b}) = {c}. So x = {x}."
    )


def _m_system(r: random.Random) -> str:
    while True:
        a1, b1, a2, b2 = (r.randint(-6, 6) for _ in range(4))
        det = a1 * b2 - a2 * b1
        if det != 0 and 0 not in (a1, b1, a2, b2):
            break
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    return (
        f"Problem. Solve the system {_poly([0, a1])}{_sign_term(b1, 'y')} = {c1} and "
        f"{_poly([0, a2])}{_sign_term(b2, 'y')} = {c2}.\n"
        f"Solution. Multiply the first equation by {b2} and the second by {b1}, then subtract: "
        f"({a1 * b2} - ({a2 * b1}))x = {c1 * b2} - ({c2 * b1}), that is {det}x = {det * x}, so x = {x}.\n"
        f"Substitute into the first equation: {b1}y = {c1} - ({a1 * x}) = {b1 * y}, so y = {y}.\n"
        f"Check the second equation: {a2} * ({x}) + {b2} * ({y}) = {c2}. "
        f"The solution is x = {x}, y = {y}."
    )


def _m_quadratic(r: random.Random) -> str:
    p, q = r.randint(-12, 12), r.randint(-12, 12)
    s, t = -(p + q), p * q
    roots = sorted({p, q})
    answer = f"x = {roots[0]}" if len(roots) == 1 else f"x = {roots[0]} or x = {roots[1]}"
    return (
        f"Problem. Solve x^2{_sign_term(s, 'x') if s else ''}{_sign_term(t) if t else ''} = 0.\n"
        f"Solution. We look for two numbers whose sum is {-s} and whose product is {t}: "
        f"they are {p} and {q}, since {p} + {q} = {p + q} and {p} * {q} = {t}.\n"
        f"So the polynomial factors as (x - {p})(x - {q}) = 0".replace("- -", "+ ")
        + f", and a product is zero exactly when a factor is zero: {answer}.\n"
        f"The discriminant is {s}^2 - 4 * {t} = {s * s - 4 * t}, "
        "which is a perfect square, as expected."
    )


def _m_euclid(r: random.Random) -> str:
    g = r.randint(2, 30)
    a, b = g * r.randint(5, 80), g * r.randint(2, 60)
    if a < b:
        a, b = b, a
    lines = [f"Problem. Find gcd({a}, {b}) and lcm({a}, {b}).", "Solution. Euclid's algorithm:"]
    x, y = a, b
    while y:
        lines.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    lines.append(f"The last non-zero remainder is {x}, so gcd({a}, {b}) = {x}.")
    lines.append(f"Then lcm({a}, {b}) = {a} * {b} / {x} = {a * b // x}.")
    return "\n".join(lines)


def _m_fractions(r: random.Random) -> str:
    a, b, c, d = r.randint(1, 12), r.randint(2, 15), r.randint(1, 12), r.randint(2, 15)
    lcm = b * d // gcd(b, d)
    s = Fraction(a, b) + Fraction(c, d)
    return (
        f"Problem. Compute {a}/{b} + {c}/{d} in lowest terms.\n"
        f"Solution. The least common denominator is lcm({b}, {d}) = {lcm}. "
        f"{a}/{b} = {a * (lcm // b)}/{lcm} and {c}/{d} = {c * (lcm // d)}/{lcm}, so the sum is "
        f"{a * (lcm // b) + c * (lcm // d)}/{lcm}"
        + (f", which reduces to {_frac(s)}." if s.denominator != lcm else ".")
        + f"\nAs a decimal this is about {float(s):.4f}."
    )


def _m_factorization(r: random.Random) -> str:
    n = r.choice([2, 3, 5, 7, 11, 13]) * r.randint(6, 600)
    lines = [f"Problem. Write {n} as a product of primes.", "Solution. Divide by the smallest prime that divides:"]
    m, p, factors = n, 2, []
    while m > 1:
        if p * p > m:
            lines.append(f"{m} has no prime divisor up to its square root, so {m} is prime.")
            factors.append(m)
            break
        if m % p == 0:
            lines.append(f"{m} = {p} * {m // p}")
            factors.append(p)
            m //= p
        else:
            p += 1
    powers = [f"{q}^{factors.count(q)}" if factors.count(q) > 1 else str(q) for q in sorted(set(factors))]
    lines.append(f"So {n} = {' * '.join(powers)}, and {n} has {_count_divisors(factors)} positive divisors.")
    return "\n".join(lines)


def _count_divisors(factors: list[int]) -> int:
    count = 1
    for q in set(factors):
        count *= factors.count(q) + 1
    return count


def _m_modpow(r: random.Random) -> str:
    base, exp, mod = r.randint(2, 20), r.randint(5, 40), r.choice([7, 11, 13, 17, 19, 23, 29, 31, 37])
    lines = [
        f"Problem. Compute {base}^{exp} mod {mod}.",
        f"Solution. Write {exp} in binary: {exp:b}. Square repeatedly modulo {mod}:",
    ]
    power, value, squares = 1, base % mod, []
    while power <= exp:
        squares.append((power, value))
        lines.append(f"{base}^{power} = {value} (mod {mod})")
        power, value = power * 2, value * value % mod
    used = [(p, v) for p, v in squares if exp & p]
    lines.append(
        f"{exp} = {' + '.join(str(p) for p, _ in used)}, so multiply "
        f"{' * '.join(str(v) for _, v in used)} modulo {mod}: "
        f"the result is {pow(base, exp, mod)}."
    )
    return "\n".join(lines)


def _m_derivative(r: random.Random) -> str:
    degree = r.randint(2, 5)
    coeffs = [r.randint(-9, 9) for _ in range(degree + 1)]
    coeffs[-1] = coeffs[-1] or 1
    deriv = [coeffs[i] * i for i in range(1, len(coeffs))]
    x0 = r.randint(-3, 3)
    value = sum(c * x0**i for i, c in enumerate(deriv))
    return (
        f"Problem. Differentiate f(x) = {_poly(coeffs)} and evaluate f'({x0}).\n"
        f"Solution. By the power rule, the derivative of x^n is n x^(n-1), and differentiation is linear, so "
        f"f'(x) = {_poly(deriv)}.\nAt x = {x0}: f'({x0}) = {value}. "
        f"The tangent line there has slope {value}."
    )


def _m_integral(r: random.Random) -> str:
    coeffs = [r.randint(-6, 6) for _ in range(r.randint(2, 4))]
    coeffs[-1] = coeffs[-1] or 1
    a, b = sorted(r.sample(range(-3, 5), 2))
    anti = [Fraction(0)] + [Fraction(c, i + 1) for i, c in enumerate(coeffs)]

    def F(x: int) -> Fraction:
        return sum((c * x**i for i, c in enumerate(anti)), Fraction(0))

    terms = " ".join(("+ " if i else "") + f"({_frac(c)})x^{i}" for i, c in enumerate(anti) if c and i)
    return (
        f"Problem. Compute the integral of f(x) = {_poly(coeffs)} from {a} to {b}.\n"
        f"Solution. An antiderivative is F(x) = {terms}.\n"
        f"By the fundamental theorem of calculus the integral is F({b}) - F({a}) = "
        f"{_frac(F(b))} - ({_frac(F(a))}) = {_frac(F(b) - F(a))}."
    )


def _m_series(r: random.Random) -> str:
    a, d, n = r.randint(-10, 20), r.randint(1, 9), r.randint(5, 60)
    last = a + (n - 1) * d
    return (
        f"Problem. Find the sum of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ..., {last}.\n"
        f"Solution. The first term is {a} and the common difference is {d}, so the number of terms is "
        f"({last} - ({a})) / {d} + 1 = {n}.\nPairing the first term with the last, the second with the "
        f"second-to-last, and so on, every pair sums to {a + last}, so the sum is "
        f"{n} * ({a} + {last}) / 2 = {n * (a + last) // 2}."
    )


_DEFINITIONS = [
    "Definition. An integer p > 1 is prime if its only positive divisors are 1 and p. An integer n > 1 "
    "that is not prime is composite. By the fundamental theorem of arithmetic every integer n > 1 is a "
    "product of primes, and this product is unique up to the order of the factors.",
    "Definition. For integers a and b, we say that a divides b, written a | b, if there is an integer k "
    "with b = k a. The greatest common divisor gcd(a, b) is the largest integer dividing both a and b; "
    "a and b are coprime when gcd(a, b) = 1.",
    "Definition. Two integers a and b are congruent modulo a positive integer m, written a = b (mod m), if "
    "m divides a - b. Congruence modulo m is an equivalence relation, and it respects addition and "
    "multiplication: if a = b and c = d (mod m) then a + c = b + d and ac = bd (mod m).",
    "Definition. A function f from a set A to a set B assigns to every element x of A exactly one element "
    "f(x) of B. The function is injective if f(x) = f(y) implies x = y, surjective if every element of B is "
    "some f(x), and bijective if it is both.",
    "Definition. The derivative of a function f at a point a is the limit, as h tends to 0, of "
    "(f(a + h) - f(a)) / h, when this limit exists. If f has a derivative at every point of an interval, "
    "f is differentiable there, and the derivative f' is again a function.",
    "Definition. A group is a set G with an operation * such that the operation is associative, there is "
    "an identity element e with e * g = g * e = g for all g in G, and every element g has an inverse h "
    "with g * h = h * g = e. The group is abelian if g * h = h * g for all g and h.",
    "Definition. A vector space over the real numbers is a set V with an addition and a multiplication by "
    "real scalars such that V is an abelian group under addition and the scalar multiplication is "
    "distributive and associative, with 1 v = v. A set of vectors is linearly independent if no "
    "non-trivial linear combination of them is the zero vector.",
    "Definition. A sequence (a_n) of real numbers converges to a limit L if for every e > 0 there is an N "
    "such that |a_n - L| < e for every n > N. A convergent sequence is bounded, and its limit is unique.",
    "Definition. The binomial coefficient C(n, k) is the number of ways to choose k elements from a set "
    "of n elements. It equals n! / (k! (n - k)!), and Pascal's rule C(n, k) = C(n - 1, k - 1) + C(n - 1, k) "
    "holds for 0 < k < n.",
    "Definition. A matrix A is invertible if there is a matrix B with AB = BA = I, the identity matrix. A "
    "square matrix is invertible exactly when its determinant is non-zero, and then the inverse is unique.",
]


def _m_definition(r: random.Random) -> str:
    text = r.choice(_DEFINITIONS)
    if "prime if" in text:
        n = r.randint(30, 400)
        small = [p for p in range(2, n + 1) if all(p % q for q in range(2, int(p**0.5) + 1))]
        text += f" For example, the primes up to {n} are {', '.join(map(str, small[:12]))}, ... ({len(small)} in all)."
    elif "binomial" in text:
        n = r.randint(4, 12)
        k = r.randint(1, n - 1)
        from math import comb

        text += (
            f" For example, C({n}, {k}) = {comb(n, k)} and C({n - 1}, {k - 1}) + C({n - 1}, {k}) = "
            f"{comb(n - 1, k - 1)} + {comb(n - 1, k)} = {comb(n, k)}."
        )
    elif "congruent" in text:
        m = r.randint(3, 13)
        a = r.randint(10, 99)
        text += f" For example, {a} = {a % m} (mod {m}) because {m} divides {a} - {a % m} = {a - a % m}."
    return text


def _m_proof(r: random.Random) -> str:
    kind = r.randrange(4)
    n = r.randint(3, 12)
    if kind == 0:
        odd = " + ".join(str(2 * i + 1) for i in range(n))
        return (
            "Theorem. For every positive integer n, the sum of the first n odd numbers is n^2.\n"
            "Proof. By induction on n. For n = 1 the sum is 1 = 1^2. Suppose 1 + 3 + ... + (2n - 1) = n^2. "
            "Adding the next odd number 2n + 1 gives n^2 + 2n + 1 = (n + 1)^2, which is the claim for n + 1. "
            f"This completes the induction.\nExample: for n = {n}, {odd} = {n * n} = {n}^2."
        )
    if kind == 1:
        return (
            "Theorem. For every positive integer n, 1 + 2 + ... + n = n(n + 1)/2.\n"
            "Proof. Write the sum S twice, once forwards and once backwards, and add the two rows term by "
            "term: each of the n columns sums to n + 1, so 2S = n(n + 1), and S = n(n + 1)/2.\n"
            f"Example: for n = {n}, the sum is {n * (n + 1) // 2} = {n} * {n + 1} / 2."
        )
    if kind == 2:
        return (
            "Theorem. The square root of 2 is irrational.\n"
            "Proof. Suppose sqrt(2) = p/q with integers p and q, q > 0, and the fraction in lowest terms. "
            "Then p^2 = 2 q^2, so p^2 is even, hence p is even; write p = 2k. Then 4k^2 = 2q^2, so "
            "q^2 = 2k^2 and q is even as well. Then 2 divides both p and q, contradicting lowest terms. "
            "Hence no such fraction exists."
        )
    primes = [p for p in range(2, 60) if all(p % q for q in range(2, int(p**0.5) + 1))][: n % 6 + 2]
    prod = 1
    for p in primes:
        prod *= p
    return (
        "Theorem. There are infinitely many primes.\n"
        "Proof. Suppose p_1, ..., p_k were all the primes, and let N = p_1 p_2 ... p_k + 1. N > 1, so "
        "some prime p divides N. But p is one of the p_i, and p_i divides N - 1, so p would divide "
        "N - (N - 1) = 1, which is impossible. So the list was not complete.\n"
        f"Example: {' * '.join(map(str, primes))} + 1 = {prod + 1}."
    )


_MATH_TEMPLATES: list[Callable[[random.Random], str]] = [
    _m_addition,
    _m_multiplication,
    _m_linear,
    _m_system,
    _m_quadratic,
    _m_euclid,
    _m_fractions,
    _m_factorization,
    _m_modpow,
    _m_derivative,
    _m_integral,
    _m_series,
    _m_definition,
    _m_proof,
]


def generated_documents(next_item: Callable[[], str], target_bytes: int) -> list[str]:
    """Documents of 1-2 KB, each several items from ``next_item`` joined by blank lines, until
    ``target_bytes`` of text: how the synthetic domains are cut into documents."""
    docs: list[str] = []
    total = 0
    while total < target_bytes:
        items: list[str] = []
        size = 0
        while size < DOC_MIN_BYTES:
            item = next_item()
            if items and size + _nbytes(item) + 2 > DOC_MAX_BYTES:
                break
            items.append(item)
            size += _nbytes(item) + 2
        doc = "\n\n".join(items)
        docs.append(doc)
        total += _nbytes(doc)
    return docs


def math_documents(target_bytes: int, seed: int = MATH_SEED) -> list[str]:
    """Synthetic mathematics: documents of 1-2 KB, each several worked items, until target_bytes."""
    r = random.Random(seed)
    return generated_documents(lambda: r.choice(_MATH_TEMPLATES)(r), target_bytes)


# ---------------------------------------------------------------------------------------------
# the corpora


def domain_documents(name: str, target_bytes: int = DEFAULT_DOMAIN_BYTES) -> list[str]:
    """The documents of domain ``name`` (one of DOMAINS), shuffled with a fixed seed."""
    if name == "math":
        docs = math_documents(target_bytes)
    else:
        sources = {"general": general_sources, "code": code_sources, "law": law_sources}[name]()
        docs = _take(sources, target_bytes)
        total = sum(map(_nbytes, docs))
        if total < min(MIN_DOMAIN_BYTES, target_bytes):
            raise CorpusError(
                f"{name}: only {total} bytes of text found on this machine (need {min(MIN_DOMAIN_BYTES, target_bytes)})"
            )
    random.Random(f"{SHUFFLE_SEED}-{name}").shuffle(docs)
    return docs


def write_jsonl(path: str, docs: Sequence[str]) -> int:
    """Write ``{"text": doc}`` lines to ``path`` atomically (temp file, then rename); return bytes."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def build_corpora(
    output_dir: str,
    domain_bytes: int = DEFAULT_DOMAIN_BYTES,
    domains: Sequence[str] = DOMAINS,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, str]:
    """Write OUTPUT_DIR/<domain>.jsonl for every domain; return {domain: path}."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for name in domains:
        docs = domain_documents(name, domain_bytes)
        path = os.path.join(output_dir, f"{name}.jsonl")
        size = write_jsonl(path, docs)
        if log:
            log(
                f"{name:8s} {len(docs):5d} documents, {sum(map(_nbytes, docs)) / 1e3:6.1f} KB of text -> {path} "
                f"({size / 1e3:.1f} KB)"
            )
        paths[name] = path
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: write the corpora to --output-dir; 2 when a domain's sources are missing."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--domain-bytes", type=int, default=DEFAULT_DOMAIN_BYTES, help="text per domain")
    args = p.parse_args(argv)
    try:
        build_corpora(args.output_dir, args.domain_bytes, log=print)
    except CorpusError as error:
        print(f"corpora: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
