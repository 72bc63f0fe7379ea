"""``prefopt bench``: variants x seeds trained on one data set, evaluated alike, compared in one report.

One job per module:

- ``recipe``: the bench recipe's schema, and the training recipe of every entry x seed, all validated
  before anything trains.
- ``files``: the names of the files a bench writes, and writing them atomically.
- ``processes``: a child process with its own wall time and peak memory.
- ``runner``: trains each run in a child (``python -m prefopt.cli train``), evaluates it in another
  (``python -m prefopt.bench.evaluate``), skips what an earlier invocation finished.
- ``evaluate``: the evaluation child: each run's completions of the held-out prompts, judged (the bench's
  ``eval.judge`` or the task's reward; ``prefopt.judged``), with their KL to the run's reference and their
  win rates against the initial model's completions.
- ``results``: a finished run's files -> one row; rows -> per-entry means and spreads.
- ``report``: ``results.jsonl``, ``leaderboard.md``, ``leaderboard.html``, ``leaderboard.json``.
- ``plots``: the PNG figures (matplotlib, imported only when plotting).
"""
