"""Bring your own method, loss, sampler, augmentation or dataset: the public API a plugin calls.

A plugin is a Python file or an importable module that, when imported, registers what it brings
through the functions below. fairtune imports it for ``--plugin PATH_OR_MODULE`` (any command,
repeatable), for each path or module in ``FAIRTUNE_PLUGINS`` (``os.pathsep``-separated), and for
each entry point of installed packages in the group ``fairtune.plugins``. A plugin's method then
goes through ``search``, ``final``, ``protocol``, ``report``, ``list`` and TensorBoard exactly as a
built-in one. README "Adding a method or a dataset" has a worked example; ``examples/groupdro.py``
is a complete one.

Ray's workers import the same plugins: the CLI puts the specs it loaded in ``FAIRTUNE_PLUGINS``,
which the Ray jobs carry, and a registry lookup that misses loads them first. On a multi-node
cluster a plugin file must exist at the same path on every node (or be an installed package).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from fairtune import hyperparameters as _hyperparameters
from fairtune import terms as _terms
from fairtune.errors import UserError
from fairtune.hyperparameters import Hyperparameter
from fairtune.terms import Batch, LossTerm, TrainedTerm

ENV = "FAIRTUNE_PLUGINS"
ENTRY_POINT_GROUP = "fairtune.plugins"

_loaded: dict[str, str] = {}  # spec as given -> the spec workers load (an absolute path or a module name)
_current: list[str] = []  # the plugin being imported, for error messages and spaces beside it
_installed_done = False
_spaces_beside: dict[str, Path] = {}  # method -> the folder of the plugin file that registered it


# -- the API -----------------------------------------------------------------------------------------


def hyperparameter(
    name: str,
    symbol: str | None = None,
    help: str = "",
    *,
    positive: bool = False,
    distribution: str = "loguniform",
    values: Sequence[float] = (),
    low: float | None = 1e-4,
    high: float | None = 1e2,
    default: float = 1.0,
) -> Hyperparameter:
    """A new row of the hyperparameter table: it gets a flag ``--<name>``, a symbol in tables, a
    validity rule (``positive``: > 0, else >= 0) and a standard search space (``distribution``
    "loguniform" over ``[low, high]`` or "choice" of ``values``; ``default`` is tried first)."""
    row = Hyperparameter(
        name, symbol or name, help or name, positive=positive, distribution=distribution, values=tuple(values),
        low=None if distribution == "choice" else low, high=None if distribution == "choice" else high, default=default,
    )
    return _register(_hyperparameters.register, row)


def term(
    name: str,
    fn: Callable,
    *,
    reads: Sequence[str] = (),
    needs_teacher: bool = False,
    teacher_outputs: Iterable[str] = ("logits", "features"),
    annealed: bool = False,
) -> LossTerm:
    """A loss term ``fn(student, teacher, batch, hp) -> scalar`` added to the student's loss.

    ``student``/``teacher`` carry ``.logits``, ``.features`` and ``.feature_map`` (teacher None when
    the method has none); ``batch`` is a :class:`fairtune.terms.Batch`; ``hp`` maps each name in
    ``reads`` (hyperparameter rows) to the run's value. ``teacher_outputs`` says which teacher outputs
    it reads ("feature_map" keeps the teacher's forward in every step)."""
    spec = LossTerm(name, fn, tuple(reads), needs_teacher, frozenset(teacher_outputs) if needs_teacher else frozenset(), annealed)
    return _register(_terms.register, spec)


def trained_term(cls: type[TrainedTerm]) -> type[TrainedTerm]:
    """Class decorator: a term with trainable state (modules, optimisers, schedulers, buffers), one
    instance per run; see :class:`fairtune.terms.TrainedTerm` for the hooks and their order."""
    if not (isinstance(cls, type) and issubclass(cls, TrainedTerm)):
        raise UserError(f"trained_term takes a subclass of fairtune.terms.TrainedTerm, not {cls!r}")
    if not isinstance(getattr(cls, "name", None), str):
        raise UserError(f"trained term {cls.__name__} needs a class attribute name = '<term name>'")
    return _register(_terms.register, cls)


def sampler(name: str, fn: Callable) -> Callable:
    """``fn(labels, groups, num_classes, num_groups, batch_size, generator) -> (num_batches, B)``
    int64 index plan of one epoch; draw every random number from ``generator`` (resume replays it)."""
    from fairtune.data import sampler as samplers

    return _register(samplers.register, name, fn)


def augmentation(name: str, draw: Callable, apply: Callable) -> None:
    """A training augmentation a dataset can name (``DatasetInfo.augment``): ``draw((num_batches,
    batch_size), generator) -> dict`` of random tensors for a whole epoch, drawn from ``generator``
    only; ``apply(source, x, params) -> x`` augments one float batch in [0, 1] with its row of them
    (``source.info.image_size`` is the side the model sees)."""
    from fairtune.data import loader

    _register(loader.register_augmentation, name, draw, apply)


def method(
    name: str,
    label: str | None = None,
    *,
    terms: Sequence[str | tuple[str, Mapping[str, str]]] = (),
    sampler: str = "random",
    searched: str | None = None,
    fixed_from: Mapping[str, str] | None = None,
    hint_term: str | None = None,
    ce: bool = True,
    composable: bool = False,
):
    """A method: its terms (names, or ``(name, {term's hyperparameter: config name})``), sampler,
    the hyperparameter its search tunes, fixed ones taken from another method's best config, and
    whether the student's cross-entropy is a term (``ce=False``: a term replaces it). ``composable``
    lets ``ss+<name>`` and ``ad+<name>`` exist."""
    from fairtune.methods import Method, Use
    from fairtune.methods import register as register_method

    uses = tuple(Use(t) if isinstance(t, str) else Use(t[0], tuple(dict(t[1]).items())) for t in terms)
    entry = Method(
        name, label or name, uses, sampler, hint_term, searched, tuple((fixed_from or {}).items()), ce, composable,
    )
    result = _register(register_method, entry)
    if _current and Path(_current[-1]).suffix == ".py":
        _spaces_beside[name] = Path(_current[-1]).parent
    return result


def dataset(name: str, source) -> None:
    """A dataset: ``source`` is a module or object with ``info``, ``EXPECTED``, ``locate``, ``load``
    and optionally ``OPTIONS`` (the contract in :mod:`fairtune.data.base`)."""
    from fairtune.data import register_dataset

    _register(register_dataset, name, source)


def space(method_name: str, spec: Mapping | str | os.PathLike) -> None:
    """A method's search space: a dict with the keys of a ``search_spaces/*.yaml`` file, or the path
    of such a YAML (relative paths are beside the plugin). Without one, ``<method>.yaml`` beside a
    plugin file is used, else the standard space of the searched hyperparameter."""
    from fairtune import spaces

    if not isinstance(spec, Mapping):
        path = Path(spec)
        if not path.is_absolute() and _current and Path(_current[-1]).suffix == ".py":
            path = Path(_current[-1]).parent / path
        spec = path
    _register(spaces.register_space, method_name, spec)


# -- loading -------------------------------------------------------------------------------------------


def _register(fn, *args):
    try:
        return fn(*args)
    except UserError as exc:
        if _current:
            raise UserError(f"plugin {_current[-1]}: {exc}") from None
        raise


def space_folder(method_name: str) -> Path | None:
    """The folder of the plugin file that registered ``method_name`` (its spaces may lie there)."""
    return _spaces_beside.get(method_name)


def _module_name(path: Path) -> str:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return f"fairtune_plugin_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"


def _is_namespace(module) -> bool:
    """A folder without __init__.py imports as an empty namespace package: nothing would register."""
    spec = getattr(module, "__spec__", None)
    return spec is not None and spec.origin is None and spec.submodule_search_locations is not None


def _import(spec: str, given: str = "--plugin") -> str:
    """Import one plugin (``given``: where it was named, for errors); returns the spec workers load.
    One-line UserError when it fails."""
    looks_like_path = spec.endswith(".py") or os.sep in spec or (os.altsep and os.altsep in spec)
    shown = spec or "''"
    named = f"--plugin {shown}" if given == "--plugin" else f"{given} entry {shown}"
    if looks_like_path:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"{named}: no such file; give the path of a .py file or an importable module name")
        name, where = _module_name(path), str(path)
    elif not all(part.isidentifier() for part in spec.split(".")):  # importlib's own error for "" or ".." is cryptic
        raise UserError(f"{named}: no file or importable module of that name; give a .py path or install the package")
    else:
        name, where = spec, spec
    already = name in sys.modules
    if already and not _is_namespace(sys.modules[name]):
        return where
    _current.append(where)
    try:
        if looks_like_path:
            module_spec = importlib.util.spec_from_file_location(name, where)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look the module up while it runs
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            importlib.import_module(name)
    except UserError as exc:
        raise _naming(exc, where) from None
    except ModuleNotFoundError as exc:
        if not looks_like_path and exc.name == spec.split(".")[0]:
            raise UserError(f"{named}: no file or importable module of that name; give a .py path or install the package") from None
        raise UserError(f"plugin {where} failed to import: {_where(exc, where)}") from None
    except Exception as exc:  # the plugin's own bug: name the file and line, not a traceback
        raise UserError(f"plugin {where} failed to import: {_where(exc, where)}") from None
    finally:
        _current.pop()
    if _is_namespace(sys.modules[name]):
        if not already:
            del sys.modules[name]
        raise UserError(f"{named}: is a folder, not a plugin module; give a .py file or a module that registers something")
    return where


def _naming(exc: UserError, where: str) -> UserError:
    """``exc`` with the plugin named, unless it names one already (an API call's refusal does)."""
    return exc if str(exc).startswith("plugin ") else UserError(f"plugin {where}: {exc}")


def _where(exc: BaseException, path: str) -> str:
    """``ExcType: message (file:line)`` at the deepest frame inside the plugin."""
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == path:
            line = frame.lineno
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return f"{text} ({Path(path).name}:{line})" if line else text


def load(specs: Iterable[str]) -> None:
    """Import the installed plugins, those ``FAIRTUNE_PLUGINS`` names and ``specs``; remember them in
    ``FAIRTUNE_PLUGINS`` so the processes this one starts (Ray's workers, whose jobs carry the
    variable) import them too."""
    load_installed()
    specs_now = [s for s in os.environ.get(ENV, "").split(os.pathsep) if s]
    for spec, given in [*((s, ENV) for s in specs_now), *((s, "--plugin") for s in specs)]:
        if spec not in _loaded:
            _loaded[spec] = _import(spec, given)
    # As loaded (absolute paths): a relative one would be read against a Ray worker's own folder.
    specs_now = list(dict.fromkeys([*(_loaded.get(s, s) for s in specs_now), *_loaded.values()]))
    if specs_now:
        os.environ[ENV] = os.pathsep.join(specs_now)


def load_installed() -> None:
    """Import every entry point of the group ``fairtune.plugins`` (once per process)."""
    global _installed_done
    if _installed_done:
        return
    _installed_done = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"{entry.value} (entry point {entry.name} of {entry.dist.name if entry.dist else 'an installed package'})"
        _current.append(where)
        try:
            entry.load()
        except UserError as exc:
            raise _naming(exc, where) from None
        except Exception as exc:
            raise UserError(f"plugin {where} failed to import: {_where(exc, '')}") from None
        finally:
            _current.pop()


def ensure_loaded() -> None:
    """Load what ``FAIRTUNE_PLUGINS`` names and the installed plugins; registries call this on a
    miss, so a Ray worker knows a plugin's names before it reads a config that uses them."""
    load(())


@contextlib.contextmanager
def isolated():
    """For tests: registrations made inside are undone on exit (and FAIRTUNE_PLUGINS restored)."""
    from fairtune import methods, spaces
    from fairtune.data import DATASETS, loader
    from fairtune.data import sampler as samplers

    tables = [_hyperparameters.HYPERPARAMETERS, _terms.TERMS, methods.BASE_METHODS, samplers.SAMPLERS, DATASETS,
              loader.AUGMENTATIONS, spaces.REGISTERED_SPACES, _spaces_beside, _loaded]
    global _installed_done
    saved = [dict(t) for t in tables]
    env, installed_done = os.environ.get(ENV), _installed_done
    modules = set(sys.modules)
    try:
        yield
    finally:
        # Plugins imported inside, by file or by module name (and their submodules), are forgotten
        # too: a later load of the same spec must import it again to register its names again.
        plugins = {where for spec, where in _loaded.items() if spec not in saved[-1]}
        for name in set(sys.modules) - modules:
            if name.startswith("fairtune_plugin_") or any(name == p or name.startswith(p + ".") for p in plugins):
                del sys.modules[name]
        for table, copy in zip(tables, saved):
            table.clear()
            table.update(copy)
        _installed_done = installed_done
        if env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = env


__all__ = [
    "Batch",
    "TrainedTerm",
    "augmentation",
    "dataset",
    "hyperparameter",
    "load",
    "method",
    "sampler",
    "space",
    "term",
    "trained_term",
]
