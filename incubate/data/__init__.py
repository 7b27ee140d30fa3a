"""Data: image datasets and loaders, text corpora and their tokens (text.py, bpe.py, records.py, token_cache.py), the order a rank reads them in."""
