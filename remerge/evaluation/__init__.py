"""lm-eval runs (settings, pre-flight checks, running) and the leaderboard's scores."""
