"""Training data: the streaming train loader, the random-offset sampler and the exact
validation reader. Import the modules themselves (``ratplus_mega.data.loader`` ...): this package imports
nothing, so the spawned tokenizing workers of ``prep shards`` do not load torch."""
