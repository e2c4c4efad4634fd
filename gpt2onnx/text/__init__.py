"""Floor 3, text: the tokenizer (GPT-2's byte-level BPE) and when a row's text is done (stop strings, EOS)."""
