"""Judged evaluation: sample completions of held-out prompts, score or compare them with a judge.

One job per module:

- ``sampling``: a model's completions of prompts, batched and seeded so that the same seed gives the same
  completions (``sample_completions``, ``ModelSampler``);
- ``evaluate``: completions of held-out prompts scored by any scorer (a task's ``score``, a score judge),
  with their length and their KL to a reference (``judge_completions``);
- ``winrate``: outcomes against a baseline's completions, the win rate and the length-controlled win rate.

A task's evaluation and a bench on the user's own data both go through ``judge_completions``: a task
supplies only its prompts and its scorer.
"""
