"""lora-data: check a chat dataset and show exactly what lora-train will train on.

Its row in the command table: lora_cli/cli/commands.py."""

from .commands import entry_point

main = entry_point("lora-data")

if __name__ == "__main__":
    main()
