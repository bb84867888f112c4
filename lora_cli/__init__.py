"""lora_cli: LoRA/QLoRA fine-tuning from the command line, right by default."""

__version__ = "0.1.0"
