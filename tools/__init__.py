"""User commands: perplexity, generate (with proxy-tuning, proxy), export and average (CLIs over formats/)."""
