"""``ratplus eval``: perplexity, synthetic recall and needle-in-a-haystack per attention pattern, and
lm-evaluation-harness tasks; results as JSON, a table and pictures."""
