"""The PaLM model in Flax: config, layers, loss, optimizer, estimates, tokenizer, data."""
