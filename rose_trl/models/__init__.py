"""The models a run loads: a Hub id, a folder or a GGUF file (`source`), the final model and its start checks
(`final_model`), and the offline assets (`tiny`, `smollm2`, `gemma3`)."""
