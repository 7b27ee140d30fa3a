"""Data: image datasets and loaders, text corpora and their tokens (corpus.py, records.py, bpe.py,
token_cache.py, text.py), the order a rank reads them in."""
