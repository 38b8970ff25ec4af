"""qlora-lab: QLoRA fine-tuning on small GPUs, with a memory planner and honest benchmarks."""

__version__ = "0.1.0"
