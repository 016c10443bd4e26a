"""`tune`: choose the merge by evaluation. Candidates are written with the one-read sweep, scored one at a time
by the user's command (evaluation.py) or the built-in perplexity (perplexity.py), checked against the baseline
(guards.py), optionally joined by a greedy soup (soup.py); the scores survive an interruption (state.py)."""
