"""lora-train: fine-tune a LoRA/QLoRA adapter on a chat dataset.

Its row in the command table: lora_cli/cli/commands.py."""

from .commands import entry_point

main = entry_point("lora-train")

if __name__ == "__main__":
    main()
