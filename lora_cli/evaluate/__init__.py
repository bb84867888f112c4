"""lora-eval: score a base model and LoRA adapters on the same held-out chat rows, the way lora-train saw them.

Each model gets the assistant-token loss and perplexity (lora-train's chat template, masking and length rules,
token-weighted over the whole set) and answers generated from each row's prompt (the conversation up to its final
assistant turn), scored against that turn by exact match, contains-match and ROUGE-L F1, with generation speed.
The base loads once; adapters are switched on and off on top of it.
"""

from .command import evaluate
from .config import EvalConfig
from .inputs import Prepared, base_spec, check_output, choose_quantization, load_tokenizer, prepare, split_final_turn
from .metrics import METRICS, contains_match, exact_match, perplexity, rouge_l
from .scoring import BASE, ModelScore, active, assistant_nll, batches, generate, load_models, pad, score_model

__all__ = ["BASE", "METRICS", "EvalConfig", "ModelScore", "Prepared", "active", "assistant_nll", "base_spec", "batches",
           "check_output", "choose_quantization", "contains_match", "evaluate", "exact_match", "generate",
           "load_models", "load_tokenizer", "pad", "perplexity", "prepare", "rouge_l", "score_model",
           "split_final_turn"]
