"""Read the rows of one split from a hub dataset id, a local directory, a file or a glob of files.

Every way this can fail ends in a one-line ``PrefoptError`` that names the path and the fix; the
underlying exception is chained to it (``raise ... from``) but is never the only message.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Callable

import datasets

from prefopt.data.utf8 import check_utf8, not_utf8
from prefopt.errors import PrefoptError, did_you_mean

# File suffix -> the datasets builder that reads it. ".json" holds either JSON Lines or one array.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# datasets decompresses these on the fly, so "train.jsonl.gz" reads like "train.jsonl".
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SUPPORTED = "/".join(BUILDERS)  # for messages: ".json/.jsonl/.parquet/.csv/.arrow"


def load_rows(
    path: str, split: str, subset: str | None = None, trust_remote_code: bool = False
) -> datasets.Dataset:
    """Load one split of a preference dataset as a ``datasets.Dataset``.

    Args:
        path (str): a hub dataset id (``org/name``), a local directory (files named by split, such as
            ``train.jsonl`` and ``test.jsonl``, or a ``save_to_disk`` folder), one file, or a glob of
            files. A file or a glob is a single split called ``train``.
        split (str): the split to read; slices such as ``train[:10%]`` work except on ``save_to_disk``
            folders.
        subset (str | None): the hub configuration name (``load_dataset(path, subset)``); only for hub
            ids and directories with a dataset card.
        trust_remote_code (bool): accepted for the recipe's sake. datasets 4+ runs no dataset scripts,
            so there is no remote code to trust; a script-only dataset fails with a message saying so.

    Returns:
        datasets.Dataset: the rows, at least one.

    Raises:
        PrefoptError: the file is missing, empty or unreadable (permission denied is said so), its
            suffix unsupported, its text not UTF-8 (naming the file and line, or the row), the split
            unknown (the message lists the available ones), the split has no rows, or the hub is
            unreachable or has no such dataset.
    """
    del trust_remote_code  # see the docstring: nothing would consume it
    local = os.path.expanduser(path)
    if glob.has_magic(local):
        rows = _load_files(path, _expand_glob(path), split, subset)
    elif os.path.isdir(local):
        rows = _load_directory(path, split, subset)
    elif os.path.isfile(local):
        rows = _load_files(path, [local], split, subset)
    elif looks_local(path):
        raise PrefoptError(
            f"{path}: no such file or directory; check data.path (relative paths start at "
            f"the current directory, {os.getcwd()})"
        )
    else:
        rows = _load_hub(path, split, subset)
    if len(rows) == 0:
        raise PrefoptError(f"{path}: split '{split}' has no rows; point data.path at a file with data")
    check_utf8(path, split, rows, _local_files(path))
    return rows


def looks_local(path: str) -> bool:
    """Whether ``path`` (of a dataset or a model) can only be a local path, never a hub id.

    A hub id is ``name`` or ``owner/name``: so a path that starts with ``.``, ``/`` or ``~``, is absolute,
    holds a backslash or more than one ``/``, or ends in a data-file suffix (``.jsonl``, ``.parquet.gz``, ...)
    is local. Anything else may be either, and is left to whoever loads it.
    """
    if path.startswith((".", "/", "~")) or "\\" in path or os.path.isabs(path):
        return True
    return _builder_for(path) is not None or path.count("/") > 1


def _builder_for(file: str) -> str | None:
    """The datasets builder for a file name, looking through a compression suffix; None if unsupported."""
    name = file.lower()
    for compression in COMPRESSIONS:
        name = name.removesuffix(compression)
    return BUILDERS.get(os.path.splitext(name)[1])


def _local_files(path: str) -> list[str]:
    """The local data files ``path`` names (none for a hub id), in the order they are read."""
    local = os.path.expanduser(path)
    if glob.has_magic(local):
        return _expand_glob(path)
    if os.path.isdir(local):
        return _data_files(local)
    return [local] if os.path.isfile(local) else []


def _expand_glob(pattern: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise PrefoptError(f"{pattern}: no file matches this pattern; check data.path")
    return files


def _load_files(path: str, files: list[str], split: str, subset: str | None) -> datasets.Dataset:
    """Rows of one or more files of the same kind; together they are the split ``train``."""
    if subset is not None:
        raise PrefoptError(f"{path}: data.subset={subset!r} applies only to hub datasets; remove it")
    builders = {_builder_for(file) for file in files}
    if None in builders:
        unsupported = next(file for file in files if _builder_for(file) is None)
        raise PrefoptError(
            f"{unsupported}: unsupported file type; use {SUPPORTED} files (optionally "
            f"{'/'.join(COMPRESSIONS)} compressed)"
        )
    if len(builders) > 1:
        raise PrefoptError(
            f"{path}: matches files of different types ({', '.join(sorted(builders))}); "
            f"narrow data.path to one type"
        )
    for file in files:
        if os.path.getsize(file) == 0:
            raise PrefoptError(f"{file}: the file is empty; point data.path at a file with data")
    builder = builders.pop()

    def load(which: str | None):
        return datasets.load_dataset(builder, data_files={"train": files}, split=which)

    return _select_split(path, split, load, f"as {builder} (check that it is valid {builder})")


def _load_directory(path: str, split: str, subset: str | None) -> datasets.Dataset:
    """Rows from a ``save_to_disk`` folder, or from data files whose names give their splits."""
    local = os.path.expanduser(path)
    if _is_saved_dataset(local):
        return _load_saved(path, split)
    if not _data_files(local):
        raise PrefoptError(
            f"{path}: the directory holds no {SUPPORTED} files; add files named by split "
            f"(train.jsonl, test.jsonl) or point data.path at a file"
        )

    def load(which: str | None):
        return datasets.load_dataset(local, subset, split=which)

    return _select_split(path, split, load, "(check that its files are valid and of one type)")


def _is_saved_dataset(directory: str) -> bool:
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        return True
    return all(os.path.isfile(os.path.join(directory, f)) for f in ("state.json", "dataset_info.json"))


def _data_files(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # skips .git and .cache
        found += [os.path.join(root, file) for file in sorted(files) if _builder_for(file)]
    return found


def _load_saved(path: str, split: str) -> datasets.Dataset:
    """A ``save_to_disk`` folder: a DatasetDict keeps its split names; a lone Dataset is ``train``."""
    try:
        saved = datasets.load_from_disk(os.path.expanduser(path))
    except Exception as exc:
        if isinstance(_innermost(exc), PermissionError):
            raise _denied(path, _innermost(exc)) from exc
        raise PrefoptError(
            f"{path}: could not read the saved dataset ({_root_cause(exc)}); save it again with save_to_disk"
        ) from exc
    splits = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    if "[" in split:
        raise PrefoptError(
            f"{path}: split slices such as {split!r} do not work on save_to_disk folders; "
            f"use a plain split name ({', '.join(splits)})"
        )
    if split not in splits:
        raise _unknown_split(path, split, list(splits))
    return splits[split]


def _load_hub(path: str, split: str, subset: str | None) -> datasets.Dataset:
    def load(which: str | None):
        return datasets.load_dataset(path, subset, split=which)

    try:
        return _select_split(path, split, load, "from the hub")
    except ConnectionError as exc:
        raise PrefoptError(
            f"{path}: not a local file or directory, and the Hugging Face hub is unreachable "
            f"or has no dataset with this id; check data.path or use a local path to "
            f"json/jsonl/parquet/csv/arrow files"
        ) from exc
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise PrefoptError(
            f"{path}: not a local file or directory, and the hub has no dataset with this id "
            f"(or it is gated: run `hf auth login`); check data.path"
        ) from exc


def _select_split(path: str, split: str, load: Callable, reading: str) -> datasets.Dataset:
    """``load(None)`` gives every split (datasets prepares them all anyway); check the name, then slice."""
    try:
        with _builders_quiet():
            splits = load(None)
            name = split.split("[", 1)[0]
            if name not in splits:
                raise _unknown_split(path, split, list(splits))
            return splits[name] if name == split else load(split)
    except (PrefoptError, ConnectionError, datasets.exceptions.DatasetNotFoundError):
        raise  # _load_hub words the hub's failures
    except Exception as exc:
        # datasets says "Instruction 'train' corresponds to no data!" for files with no rows
        if "corresponds to no data" in str(exc):
            raise PrefoptError(f"{path}: no rows; point data.path at a file with data") from exc
        if isinstance(_innermost(exc), UnicodeDecodeError):  # the CSV reader decodes as it reads
            raise not_utf8(path, split, _local_files(path)) from exc
        raise _unreadable(path, reading, exc) from exc


@contextlib.contextmanager
def _builders_quiet():
    """datasets' file readers log a failure ("Failed to read file ...") before raising it; the raise is
    worded here as the one line the user sees, so the log would only be a second line saying less."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unknown_split(path: str, split: str, available: list[str]) -> PrefoptError:
    hint = did_you_mean(split, available)
    return PrefoptError(
        f"{path}: no split {split!r}{hint}; available splits: {', '.join(available)}; "
        f"set data.train_split / data.eval_split to one of them"
    )


def _unreadable(path: str, reading: str, exc: BaseException) -> PrefoptError:
    if isinstance(_innermost(exc), PermissionError):
        return _denied(path, _innermost(exc))
    config_hint = ""
    if "BuilderConfig" in str(exc) or "Config name is missing" in str(exc):
        config_hint = "; set data.subset to one of the dataset's configurations"
    return PrefoptError(f"{path}: could not read it {reading}: {_root_cause(exc)}{config_hint}")


def _denied(path: str, exc: PermissionError) -> PrefoptError:
    """Not "check that it is valid json": the file may be fine, it is the permissions that stop the read."""
    file = exc.filename or path
    return PrefoptError(f"{file}: permission denied; make the file readable (chmod u+r {file})")


def _innermost(exc: BaseException) -> BaseException:
    """The innermost chained exception: datasets wraps the parser's (or the OS's) useful one."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _root_cause(exc: BaseException) -> str:
    """First line of the innermost chained exception."""
    exc = _innermost(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
