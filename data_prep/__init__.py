"""Data-preparation jobs (installed as ``ratplus_mega.data_prep``): tokenizers and corpus → MDS shards."""
