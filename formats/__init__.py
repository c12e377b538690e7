"""Weight formats: our checkpoint directories (checkpoint), Hugging Face Llama / Mixtral (hf, export) and weight
averaging (average). Uses data/ and model/ only."""
