"""lora-merge: merge a LoRA/QLoRA adapter into its base model and check the result against base+adapter.

Its row in the command table: lora_cli/cli/commands.py."""

from .commands import entry_point

main = entry_point("lora-merge")

if __name__ == "__main__":
    main()
