"""The corpus: VADER's 10,605 rated movie-review snippets, and the openings of them that become prompts.

The snippets ship only in VADER's source distribution (the wheel has the lexicon, not the corpora), so the
sdist is downloaded once into the prefopt cache, checked against its sha256 and read in place.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from prefopt.errors import PrefoptError
from prefopt.paths import cache_dir

log = logging.getLogger(__package__)

SDIST_REQUIREMENT = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
CORPORA_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


@dataclass(frozen=True)
class Snippet:
    """One movie-review snippet with its mean human sentiment rating (-4 very negative .. +4)."""

    id: int
    rating: float
    text: str


@dataclass(frozen=True)
class Prompt:
    """The opening words of one snippet: what the policy is asked to continue."""

    snippet_id: int
    text: str


@lru_cache(maxsize=1)
def load_snippets() -> tuple[Snippet, ...]:
    """The 10,605 rated movie-review snippets, read straight from VADER's sdist (downloaded once)."""
    sdist = vader_sdist()
    with tarfile.open(sdist) as outer:
        corpora = outer.extractfile(CORPORA_MEMBER)
        with tarfile.open(fileobj=io.BytesIO(corpora.read())) as inner:
            raw = inner.extractfile(SNIPPETS_MEMBER).read()
    return tuple(_parse_snippets(raw.decode("utf-8"), source=f"{sdist}:{SNIPPETS_MEMBER}"))


def _parse_snippets(text: str, source: str) -> Iterable[Snippet]:
    # The file has CRLF line endings and no header: id <TAB> mean rating <TAB> text.
    for line_number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise PrefoptError(f"{source} line {line_number}: expected 3 tab-separated fields, got {len(fields)}")
        yield Snippet(int(fields[0]), float(fields[1]), fields[2])


def vader_sdist() -> Path:
    """The checked sdist in the prefopt cache, downloaded first if it is not there."""
    path = cache_dir("assets") / SDIST_NAME
    if not path.is_file():
        _download_sdist(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise PrefoptError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}; delete it to download it again")
    return path


def _download_sdist(path: Path) -> None:
    """``pip download`` the sdist into a private directory, then move the file into place."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=path.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   SDIST_REQUIREMENT, "-d", tmp]  # fmt: skip
        log.info("downloading the %s source distribution (once) into %s", SDIST_REQUIREMENT, path.parent)
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / SDIST_NAME
        if result.returncode != 0 or not downloaded.is_file():
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PrefoptError(
                f"could not download {SDIST_NAME} ({reason}); run `{' '.join(command[2:-2])} -d {path.parent}` "
                f"where PyPI is reachable and copy the file to {path}"
            )
        os.replace(downloaded, path)


def select_prompts(
    num_train: int, num_eval: int, words_min: int, words_max: int, seed: int, eval_seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """Disjoint snippets for train and eval, each cut to its first n words (n from ``words_min`` to
    ``words_max``, drawn per prompt). The held-out snippets are drawn with ``eval_seed``, the training ones
    with ``seed`` from the rest."""
    # A prompt must leave at least one word of its snippet unseen, or it is the whole review.
    usable = [s for s in load_snippets() if len(s.text.split()) > words_min]
    wanted = num_train + num_eval
    if wanted > len(usable):
        raise PrefoptError(
            f"data.task: num_train_prompts + num_eval_prompts = {wanted}, but only {len(usable)} snippets have "
            f"more than prompt_words_min={words_min} words; ask for fewer prompts"
        )
    # A full shuffle (not rng.sample) keeps the order independent of how many prompts are wanted:
    # the held-out prompts come first and stay the same when num_train_prompts changes.
    eval_order = _shuffled(usable, eval_seed)
    held_out = eval_order[:num_eval]
    # With eval_seed == seed this is eval_order[num_eval:], the split as it always was.
    held_out_ids = {snippet.id for snippet in held_out}
    train_order = eval_order if eval_seed == seed else _shuffled(usable, seed)
    train = [snippet for snippet in train_order if snippet.id not in held_out_ids][:num_train]
    return ([opening(s, seed, words_min, words_max) for s in train],
            [opening(s, eval_seed, words_min, words_max) for s in held_out])  # fmt: skip


def opening(snippet: Snippet, seed: int, words_min: int, words_max: int) -> Prompt:
    """The first n words of ``snippet``; n is drawn from a generator of its own (seed, snippet)."""
    words = snippet.text.split()
    rng = random.Random(f"sentiment-words:{seed}:{snippet.id}")
    n = min(rng.randint(words_min, words_max), len(words) - 1)
    return Prompt(snippet.id, " ".join(words[:n]))


def _shuffled(snippets: Sequence[Snippet], seed: int) -> list[Snippet]:
    order = list(snippets)
    random.Random(f"sentiment-order:{seed}").shuffle(order)
    return order
