"""Controlled sentiment generation on real movie-review openings, scored by VADER.

The task of Rafailov et al. (2023), "Direct Preference Optimization: Your Language Model is Secretly
a Reward Model", arXiv:2305.18290, §6.1: prompts are prefixes of movie reviews and the policy should
continue them with positive sentiment. The paper samples continuations of IMDb prefixes from the
initial model and labels pairs with a sentiment classifier. Here the prefixes are the first few words of
the 10,605 human-rated movie-review snippets that ship with VADER, and the ground-truth reward is
VADER's compound score (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment
Analysis of Social Media Text", ICWSM), so no classifier download is needed.

Per prompt the policy's initial model samples ``completions_per_prompt`` continuations; the
highest-scoring one is ``chosen`` and the lowest ``rejected``; prompts whose best and worst score tie
are skipped (and counted in ``task.json``). The reward scores the continuation alone, since the
prompt is the same for both responses and only the continuation is the policy's doing.

Options change how pairs are labelled (each is part of the data's cache identity when not at its default;
``evaluate`` always scores the plain VADER reward):

- ``random_cut``: each sampled continuation is first cut after a random number of its words (uniform
  from 1 to all of them, drawn per completion), so lengths vary; the model rarely ends a continuation by
  itself within ``max_new_tokens``, so uncut completions are nearly all the same length.
- ``length_bias``: the labeller ranks by VADER + ``length_bias`` x tokens (a labeller that likes length:
  at equal sentiment the longer completion wins); ``chosen_reward``/``rejected_reward`` stay plain VADER
  and the rows add ``chosen_tokens``/``rejected_tokens``.
- ``pairs: small_edits``: ``chosen`` is the best completion as above, and ``rejected`` is a copy of it
  with up to ``edit_words`` words replaced by words VADER rates negative (see ``small_edit``), so the two
  differ by a few tokens and the rejected one scores lower. Prompts where no replacement lowers the
  score are skipped (``skipped_no_edit`` in ``task.json``); rows add ``edits`` ([old, new] per word).

The held-out split (its prompts, its pairs and the samples ``evaluate`` scores) follows the recipe seed
unless ``eval_seed`` is set; benchmarks set it, so runs of every seed are scored on the same prompts.

The modules, in the order a build uses them: ``corpus`` (VADER's sdist, the snippets, the prompts),
``reward`` (VADER), ``pairs`` (pairing and the files written), ``cache_key`` (what identifies a build),
``store`` (a build checked before reuse, rebuilt when damaged, one builder at a time) and ``task`` (the
plugin: options, build, evaluate). Continuations are sampled by the core (``prefopt.sample_completions``,
which keeps the random stream the task's cached data was sampled with), and ``evaluate`` is the core's judged
evaluation of the task's prompts and reward (``prefopt.judge_completions``). This package is the plugin
module the ``sentiment`` entry point names, and ``prefopt_plugins.tasks.sentiment:completion_reward`` is the
reward as a judge function.
"""

from prefopt import Completion  # the core's; kept here, where it was first published

from prefopt_plugins.tasks.sentiment.corpus import SDIST_NAME, Prompt, Snippet, load_snippets
from prefopt_plugins.tasks.sentiment.pairs import NEGATIVE_WORDS, small_edit
from prefopt_plugins.tasks.sentiment.reward import completion_reward, vader_reward
from prefopt_plugins.tasks.sentiment.task import SentimentConfig, SentimentTask, prefopt_register_tasks

__all__ = [
    "NEGATIVE_WORDS",
    "SDIST_NAME",
    "Completion",
    "Prompt",
    "SentimentConfig",
    "SentimentTask",
    "Snippet",
    "completion_reward",
    "load_snippets",
    "prefopt_register_tasks",
    "small_edit",
    "vader_reward",
]
