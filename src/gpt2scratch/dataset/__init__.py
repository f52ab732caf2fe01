"""Data: the GPT-2 tokenizer, corpus preparation (data_module.py) and the token dataset (dataset.py)."""
