"""Search spaces: one YAML per method in ``search_spaces/``, validated on load.

Each names the method's one searched hyperparameter, its distribution, the paper's value per
dataset (evaluated first as a starting point) and a default for datasets without one. A plugin's
method may bring its space (``fairtune.plugin.space``, or ``<method>.yaml`` beside the plugin file).
Methods without either (``ss+at``, ``ad+nst`` …) get the standard space of their hyperparameter, a
column of the hyperparameter table (docs/protocol.md §3 choice: T in {1, 2, 3, 4, 5, 10, 20}; λ
log-uniform in [1e-4, 1e2]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fairtune import hyperparameters
from fairtune.errors import UserError
from fairtune.methods import get_method


def _shipped_spaces() -> Path:
    """The repository's ``search_spaces/`` (a checkout, an editable install), else the copy the
    package ships as ``fairtune.search_spaces`` (pyproject maps the folder there)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "search_spaces"
    return checkout if checkout.is_dir() else package / "search_spaces"


SPACES_DIR = _shipped_spaces()
KEYS = {"method", "parameter", "distribution", "values", "low", "high", "paper", "default", "fixed"}
# Plugins' spaces: method -> a dict of the YAML keys, or the path of such a YAML.
REGISTERED_SPACES: dict[str, "dict | Path"] = {}
_MISSING = object()  # a key absent from the file, told apart from one written as null


@dataclass(frozen=True)
class SearchSpace:
    method: str
    parameter: str | None  # None: nothing to search
    distribution: str | None = None  # "choice" or "loguniform"
    values: tuple[float, ...] = ()
    low: float | None = None
    high: float | None = None
    paper: dict[str, float] = field(default_factory=dict)
    default: float | None = None
    fixed: dict[str, str] = field(default_factory=dict)  # hyperparameter -> method providing it

    def text(self) -> str:
        """The space in words for ``fairtune list``: the table's wording when it is the standard one."""
        if self.parameter is None:
            return "nothing to search"
        row = hyperparameters.get(self.parameter)
        if self.distribution == row.distribution and self.values == tuple(map(float, row.values)) and (self.low, self.high) == (row.low, row.high):
            return row.space_text()
        if self.distribution == "choice":
            return f"{row.symbol} in {{{','.join(f'{v:g}' for v in self.values)}}}"
        return f"{row.symbol} log-uniform [{self.low:g}, {self.high:g}]"

    def start(self, dataset: str) -> float | None:
        """The value evaluated first: the paper's for this dataset, else the default."""
        return self.paper.get(dataset, self.default)


def _standard(method: str) -> SearchSpace:
    m = get_method(method)
    fixed = {p: source for p, source in m.fixed_from}
    if m.searched is None:
        return SearchSpace(method, None, fixed=fixed)
    row = hyperparameters.get(m.searched)
    if row.distribution == "choice":
        return SearchSpace(method, row.name, "choice", values=tuple(map(float, row.values)), default=row.default, fixed=fixed)
    return SearchSpace(method, row.name, "loguniform", low=row.low, high=row.high, default=row.default, fixed=fixed)


def register_space(method: str, spec: "dict | Path") -> None:
    """A plugin's space for its method, validated now so a bad one fails when the plugin loads."""
    if method in REGISTERED_SPACES:
        raise UserError(f"a search space for '{method}' is already registered")
    REGISTERED_SPACES[method] = spec
    try:
        _registered(method)
    except UserError:
        del REGISTERED_SPACES[method]
        raise


def _registered(method: str) -> SearchSpace | None:
    """The space a plugin brought for ``method``: registered, or ``<method>.yaml`` beside its file."""
    from fairtune.plugin import space_folder

    spec = REGISTERED_SPACES.get(method)
    if spec is None:
        folder = space_folder(method)
        if folder is None or not (folder / f"{method}.yaml").exists():
            return None
        spec = folder / f"{method}.yaml"
    if isinstance(spec, Path):
        return _read_yaml(method, spec)
    return parse_space(dict(spec), method, f"the search space registered for {method}")


def load_space(method: str, directory: Path = SPACES_DIR) -> SearchSpace:
    """The validated space of ``method``; a malformed file raises UserError naming file and key."""
    get_method(method)  # validates the name before it becomes a path
    path = Path(directory) / f"{method}.yaml"
    if not path.exists():
        # A user's folder without this method's file means the standard space: the repo's file if any.
        shipped = SPACES_DIR / f"{method}.yaml"
        if shipped.exists() and Path(directory).resolve() != SPACES_DIR.resolve():
            return load_space(method)
        return _registered(method) or _standard(method)
    return _read_yaml(method, path)


def _read_yaml(method: str, path: Path) -> SearchSpace:
    if not path.is_file():
        raise UserError(f"{path}: no such search-space file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the file or delete it to use the standard space") from None
    except Exception as exc:  # unreadable, not UTF-8, or a scalar PyYAML fails to build (2001-02-30, !!int x, …)
        why = str(exc).split(";")[0] or type(exc).__name__
        raise UserError(f"{path}: cannot read it as YAML ({why}); fix the file or delete it to use the standard space") from None
    return parse_space(raw, method, path)


def parse_space(raw: object, method: str, path: Path | str = "<space>") -> SearchSpace:
    def bad(key: str, why: str) -> UserError:
        return UserError(f"{path}: key '{key}' {why}")

    def absent(key: str, what: str) -> UserError:
        return UserError(f"{path}: key '{key}' is missing; add it: {what}")

    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of {', '.join(sorted(KEYS))}")
    unknown = set(raw) - KEYS
    if unknown:
        raise bad(sorted(map(str, unknown))[0], f"is not known; valid keys: {', '.join(sorted(KEYS))}")
    if "method" not in raw:
        raise absent("method", f"method: {method}")
    if raw.get("method") != method:
        raise bad("method", f"is {raw.get('method')!r} but the file is for '{method}'")
    expected = get_method(method).searched
    parameter = raw.get("parameter")
    if "parameter" not in raw and expected is not None:
        raise absent("parameter", f"parameter: {expected}")
    if parameter != expected:
        raise bad("parameter", f"is {parameter!r}; method {method} searches {expected!r}")
    fixed = raw.get("fixed") or {}
    wanted_fixed = dict(get_method(method).fixed_from)
    if fixed != wanted_fixed:
        raise bad("fixed", f"is {fixed!r}; method {method} takes {wanted_fixed!r}")
    if parameter is None:
        extra = set(raw) - {"method", "parameter", "fixed"}
        if extra:
            raise bad(sorted(extra)[0], f"makes no sense: {method} has nothing to search")
        return SearchSpace(method, None, fixed=fixed)

    def number(key: str, value: object = _MISSING) -> float:
        if value is _MISSING:
            raise absent(key, "a positive finite number")
        try:
            finite = isinstance(value, (int, float)) and math.isfinite(value)
        except OverflowError:  # YAML reads 1000…0 as an int of any size; no float holds it
            raise bad(key, "must be a positive finite number, got one beyond float range") from None
        if isinstance(value, bool) or not finite or value <= 0:
            hint = " (YAML reads 1e5 as text: write 1.0e+5)" if isinstance(value, str) else ""
            raise bad(key, f"must be a positive finite number, got {value!r}{hint}")
        return float(value)

    if "distribution" not in raw:
        raise absent("distribution", "choice or loguniform")
    distribution = raw.get("distribution")
    if distribution == "choice":
        if "values" not in raw:
            raise absent("values", "a non-empty list of the values to try")
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise bad("values", "must be a non-empty list for distribution 'choice'")
        values = tuple(number("values", v) for v in values)
        low = high = None
        allowed = lambda v: v in values  # noqa: E731
    elif distribution == "loguniform":
        low, high = number("low", raw.get("low", _MISSING)), number("high", raw.get("high", _MISSING))
        if low >= high:
            raise bad("low", f"must be below high ({low} >= {high})")
        values = ()
        allowed = lambda v: low <= v <= high  # noqa: E731
    else:
        raise bad("distribution", f"is {distribution!r}; valid: choice, loguniform")
    paper = raw.get("paper") or {}
    if not isinstance(paper, dict):
        raise bad("paper", "must map dataset names to values")
    from fairtune.data import DATASETS

    for name in paper:
        if name not in DATASETS:
            raise bad(f"paper.{name}", f"names no dataset; valid: {', '.join(DATASETS)}")
    paper = {str(k): number(f"paper.{k}", v) for k, v in paper.items()}
    default = number("default", raw.get("default", _MISSING))
    for key, value in [*((f"paper.{k}", v) for k, v in paper.items()), ("default", default)]:
        if not allowed(value):
            raise bad(key, f"value {value} lies outside the searched space")
    return SearchSpace(method, parameter, distribution, values, low, high, paper, default, fixed)
