"""Generation from exported models with the compressed decode cache."""
