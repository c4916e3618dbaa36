"""A fifth domain for the demo's ``--grow`` stage: **synthetic** gene records, nothing downloaded.

Each record is a FASTA-style entry: a header (gene name, organism, lengths), the coding DNA sequence
in lines of 60 bases, its translation by the standard genetic code, and its GC content. Proteins are
drawn at random (``random.Random`` with a fixed seed), each amino acid encoded by one of its codons,
so the same seed always gives byte-identical documents and every translation and count is computed,
hence true. The text is unlike the four original domains (prose, Python, licenses, worked maths),
so a mixture that never saw it has a high perplexity on it: room for a new expert to help.
"""

from __future__ import annotations

import random

from . import corpora

BIO_SEED = 27182

# The standard genetic code: amino acid (one letter) -> its codons; '*' is the stop.
CODONS = {
    "A": ("GCT", "GCC", "GCA", "GCG"),
    "R": ("CGT", "CGC", "CGA", "CGG", "AGA", "AGG"),
    "N": ("AAT", "AAC"),
    "D": ("GAT", "GAC"),
    "C": ("TGT", "TGC"),
    "Q": ("CAA", "CAG"),
    "E": ("GAA", "GAG"),
    "G": ("GGT", "GGC", "GGA", "GGG"),
    "H": ("CAT", "CAC"),
    "I": ("ATT", "ATC", "ATA"),
    "L": ("TTA", "TTG", "CTT", "CTC", "CTA", "CTG"),
    "K": ("AAA", "AAG"),
    "M": ("ATG",),
    "F": ("TTT", "TTC"),
    "P": ("CCT", "CCC", "CCA", "CCG"),
    "S": ("TCT", "TCC", "TCA", "TCG", "AGT", "AGC"),
    "T": ("ACT", "ACC", "ACA", "ACG"),
    "W": ("TGG",),
    "Y": ("TAT", "TAC"),
    "V": ("GTT", "GTC", "GTA", "GTG"),
    "*": ("TAA", "TAG", "TGA"),
}
_AMINO_ACIDS = "".join(a for a in CODONS if a not in "M*")
_ORGANISMS = (
    "Escherichia coli",
    "Bacillus subtilis",
    "Saccharomyces cerevisiae",
    "Arabidopsis thaliana",
    "Drosophila melanogaster",
    "Caenorhabditis elegans",
    "Mus musculus",
    "Danio rerio",
)
_FUNCTIONS = (
    "membrane transporter",
    "DNA-binding regulator",
    "ribosomal protein",
    "heat shock protein",
    "kinase",
    "oxidoreductase",
    "ATP synthase subunit",
    "tRNA ligase",
)


def translate(dna: str) -> str:
    """The protein a coding sequence encodes (standard code), stop included as '*'."""
    table = {codon: amino for amino, codons in CODONS.items() for codon in codons}
    return "".join(table[dna[i : i + 3]] for i in range(0, len(dna) - 2, 3))


def gene_record(r: random.Random) -> str:
    """One gene: header, coding sequence (60 bases a line), translation, GC content."""
    protein = "M" + "".join(r.choice(_AMINO_ACIDS) for _ in range(r.randint(20, 70))) + "*"
    dna = "".join(r.choice(CODONS[a]) for a in protein)
    name = f"{r.choice('abcdefghijklmnopqrstuvwxyz')}{r.choice('abcdefghijklmnopqrstuvwxyz')}{r.choice('ABCDEFGH')}"
    name = name[0].upper() + name[1:] + str(r.randint(1, 9))
    gc = 100.0 * sum(base in "GC" for base in dna) / len(dna)
    lines = [
        f">{name} | {r.choice(_ORGANISMS)} | {r.choice(_FUNCTIONS)} | {len(dna)} bp | {len(protein) - 1} aa",
        *(dna[i : i + 60] for i in range(0, len(dna), 60)),
        f"translation: {translate(dna)}",
        f"GC content: {gc:.1f}%",
    ]
    return "\n".join(lines)


def bio_documents(target_bytes: int, seed: int = BIO_SEED) -> list[str]:
    """Documents of 1-2 KB of gene records, until ``target_bytes`` of text."""
    r = random.Random(seed)
    return corpora.generated_documents(lambda: gene_record(r), target_bytes)
