"""The names of the files lora_cli reads and writes, in one place: several commands read what another wrote."""

# A peft adapter folder, as lora-train writes it and lora-merge / lora-eval read it.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_CONFIG = "run_config.yaml"  # every setting of the run, in the --config format
TRAIN_METRICS = "train_metrics.json"

# Written into a folder (checkpoint, adapter, merged model) once every file of it is on disk, with their checksums.
COMPLETE_MARKER = "lora_cli_complete.json"

# lora-train's resumable state in --output_dir.
RUN_STATE = "run_state.json"  # data hashes and the eval loss before training, for resumes
CHECKPOINT_STAGING = ".checkpoint.partial"
FINAL_STAGING = ".final.partial"

# A Hugging Face model folder.
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Reports.
MERGE_REPORT = "merge_report.json"
DATA_REPORT = "data_report.json"
GENERATIONS = "generations.jsonl"  # lora-eval's answers, next to its report

ENCODE_STATS = "encode_stats.json"  # in a data cache entry
SOURCES = "sources.json"  # in a data cache entry: rows per data source
