"""lora-export: convert a merged model to a GGUF file (llama.cpp, Ollama, LM Studio) and check it loads back.

Its row in the command table: lora_cli/cli/commands.py."""

from .commands import entry_point

main = entry_point("lora-export")

if __name__ == "__main__":
    main()
