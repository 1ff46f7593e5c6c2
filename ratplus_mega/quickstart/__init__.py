"""The quickstart: the whole pipeline on a synthetic corpus (or the user's files), end to end."""
