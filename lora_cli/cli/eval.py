"""lora-eval: compare a base model and LoRA adapters on held-out chat data.

Its row in the command table: lora_cli/cli/commands.py."""

from .commands import entry_point

main = entry_point("lora-eval")

if __name__ == "__main__":
    main()
