"""optbatch_ds: on-policy batch selection (OptBatch / SLAP) for instruction tuning with DeepSpeed.

Install for development on a CPU machine (keeps the CPU torch wheel):
    pip install torch==2.13.0 && pip install --no-build-isolation -e ".[dev,mpi]"
"""
from setuptools import find_packages, setup

setup(
    name="optbatch_ds",
    version="0.1.0",
    description="Instruction-tune LLMs with DeepSpeed on the part of each batch worth training on (OptBatch)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["optbatch_ds", "optbatch_ds.*"]),
    install_requires=[
        # Open range so GPU users keep their CUDA build; CPU set-up pins the CPU wheel first.
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.46",
        "datasets>=2.19",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "sacrebleu>=2.4",
        "rouge-score>=0.1.2",
        "accelerate>=0.34",
        "tqdm>=4.66",
        "numpy>=1.24",
        # LoRA is how most users fine-tune: PEFT is pure Python and never pulls a torch of its own
        # (QLoRA + ZeRO-3 needs peft > 0.13).
        "peft>=0.14",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1", "mpich>=4.1"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "matplotlib>=3.8", "pyarrow>=14", "tensorboard>=2.14"],
        "bench": ["matplotlib>=3.8"],
        "peft": ["peft>=0.14"],                  # kept for `pip install optbatch_ds[peft]`; now a core dependency
        "trackers": ["tensorboard>=2.14"],       # --report-to tensorboard
        "wandb": ["wandb>=0.16"],                # --report-to wandb (optional: pulls no torch either)
        "qlora": ["bitsandbytes>=0.45"],         # --load-in-4bit, CUDA GPUs only
    },
)
