"""The plugin API (``fairtune.plugin``) and its complete example, ``examples/groupdro.py``.

Every test of the suite runs inside ``plugin.isolated()`` (tests/conftest.py), so what one registers
never reaches another test. The GroupDRO term is checked against a plain NumPy loop over groups, its
sampler batch by batch, its state by an exact resume, and the whole method through ``search``,
``final`` and ``report`` run as the commands a user types (their Ray workers import the plugin).
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fairtune import hyperparameters, methods, plugin, spaces, terms
from fairtune.cli import build_parser, main
from fairtune.data import sampler as samplers
from fairtune.engine import Trainer, TrainConfig
from fairtune.models import ModelOutput
from fairtune.terms import Batch
from tests.fixtures.synthetic import tiny_splits
from tests.helpers import assert_one_line_error

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "groupdro.py"
SPACE = yaml.safe_load((REPO / "examples" / "groupdro.yaml").read_text())
CPU = torch.device("cpu")


def groupdro():
    """Load the example; its module (the term class, the sampler, ``group_losses``)."""
    plugin.load([str(EXAMPLE)])
    return sys.modules[terms.get("groupdro").__module__]


def write_plugin(folder: Path, body: str, name: str = "bad.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def help_text(capsys, *argv: str) -> str:
    """``fairtune <argv> --help``'s text."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


# -- registration -------------------------------------------------------------------------------------


def test_the_example_registers_what_list_the_parser_the_table_and_search_see(capsys):
    assert main(["list", "--plugin", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("  groupdro ")]
    assert line.split() == "groupdro GroupDRO η log-uniform [0.001, 1] (no teacher, group-balanced sampler)".split()
    assert out.index("  mmd ") < out.index("  groupdro ")  # plugins' methods after the built-in ones

    method = methods.get_method("groupdro")
    assert (method.label, method.sampler, method.searched, method.ce, method.needs_teacher) == ("GroupDRO", "group-balanced", "eta", False, False)
    assert [use.term for use in method.terms] == ["groupdro"] and method.params == ("eta",)
    assert "groupdro" in methods.all_method_names() and "groupdro" not in methods.BUILTIN_METHODS

    row = hyperparameters.get("eta")
    assert (row.symbol, row.positive, row.distribution, row.low, row.high, row.default) == ("η", True, "loguniform", 1e-3, 1.0, 0.01)
    assert row.problem(0.0) and row.problem(-1.0) and row.problem(0.5) is None
    from fairtune.report import hyperparameter_text

    assert hyperparameter_text("groupdro", {"eta": 0.0123}) == "η=0.0123"

    for command in (["train"], ["search"]):
        args = build_parser().parse_args([*command, "--method", "groupdro", "--dataset", "imagefolder", "--eta", "0.05"])
        assert args.eta == 0.05
    assert "--eta ETA" in help_text(capsys, "train", "--plugin", str(EXAMPLE)) and "--eta ETA" in help_text(capsys, "search")

    # The method's space is groupdro.yaml beside the plugin file (the next test tells the two apart).
    space = spaces.load_space("groupdro")
    assert (space.parameter, space.distribution, space.low, space.high, space.default) == (
        SPACE["parameter"], SPACE["distribution"], SPACE["low"], SPACE["high"], SPACE["default"],
    )
    assert plugin.space_folder("groupdro") == EXAMPLE.parent
    # The processes this one starts (Ray's workers) are told which file to import.
    assert str(EXAMPLE) in os.environ[plugin.ENV].split(os.pathsep)


def test_a_yaml_beside_the_plugin_file_is_the_methods_space(tmp_path):
    write_plugin(tmp_path, EXAMPLE.read_text(), "groupdro.py")
    (tmp_path / "groupdro.yaml").write_text(yaml.safe_dump({**SPACE, "low": 0.02, "high": 0.5, "default": 0.1}))
    plugin.load([str(tmp_path / "groupdro.py")])
    space = spaces.load_space("groupdro")
    assert (space.low, space.high, space.default) == (0.02, 0.5, 0.1)
    (tmp_path / "groupdro.yaml").unlink()  # none beside it: the standard space of the row
    space = spaces.load_space("groupdro")
    assert (space.low, space.high, space.default) == (1e-3, 1.0, 0.01)


def readme_plugin() -> str:
    """The example plugin of README.md's "Adding a method or a dataset"."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Adding a method or a dataset") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))]


def test_the_readme_plugin_works_and_a_registered_space_dict_is_its_space(tmp_path, capsys):
    body = readme_plugin() + (
        'plugin.space("logitpen", {"method": "logitpen", "parameter": "gamma", "distribution": "choice",\n'
        '                          "values": [0.01, 0.1, 1.0], "default": 0.1})\n'
    )
    path = write_plugin(tmp_path, body, "logitpen.py")
    assert main(["list", "--plugin", str(path)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  logitpen ")]
    assert line.split() == "logitpen LogitPen γ in {0.01,0.1,1} (no teacher, random sampler)".split()  # its own space
    space = spaces.load_space("logitpen")
    assert (space.distribution, space.values, space.default) == ("choice", (0.01, 0.1, 1.0), 0.1)
    method = methods.get_method("logitpen")
    assert method.ce and method.params == ("gamma",)  # the term adds to the cross-entropy
    term = terms.get("logit_penalty")
    logits = torch.tensor([[1.0, -3.0]])
    assert float(term(ModelOutput(logits, None, None), None, None, {"gamma": 0.5})) == pytest.approx(0.5 * 5.0)


# -- isolation ----------------------------------------------------------------------------------------


def test_isolation_1_a_plugin_registers_its_names():
    groupdro()
    assert "groupdro" in methods.BASE_METHODS and "groupdro" in terms.TERMS
    assert "eta" in hyperparameters.HYPERPARAMETERS and "group-balanced" in samplers.SAMPLERS


def test_isolation_2_the_next_test_sees_none_of_them(capsys):
    """Runs after the test above (file order): the autouse fixture undid its registrations."""
    assert "groupdro" not in methods.BASE_METHODS and "groupdro" not in terms.TERMS
    assert "eta" not in hyperparameters.HYPERPARAMETERS and "group-balanced" not in samplers.SAMPLERS
    assert "groupdro" not in spaces.REGISTERED_SPACES and plugin.space_folder("groupdro") is None
    assert str(EXAMPLE) not in os.environ.get(plugin.ENV, "")
    assert not [name for name in sys.modules if name.startswith("fairtune_plugin_groupdro")]
    with pytest.raises(plugin.UserError, match="unknown method 'groupdro'"):
        methods.get_method("groupdro")
    assert "--eta" not in help_text(capsys, "train")


def test_isolated_undoes_a_plugin_loaded_by_module_name_so_it_loads_again(tmp_path, monkeypatch):
    write_plugin(tmp_path, """\
        from fairtune import plugin

        plugin.method("modplugin", "ModPlugin", sampler="balanced")
        """, "ft_module_plugin.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):  # the second time the module must run again, or it would register nothing
        with plugin.isolated():
            plugin.load(["ft_module_plugin"])
            assert methods.get_method("modplugin").sampler == "balanced"
            assert "ft_module_plugin" in os.environ[plugin.ENV].split(os.pathsep)
        assert "modplugin" not in methods.BASE_METHODS and "ft_module_plugin" not in sys.modules
        assert "ft_module_plugin" not in os.environ.get(plugin.ENV, "")


# -- every failure: exit 2, one line naming the plugin, no traceback -----------------------------------

FAILURES = {
    "syntax error": ("import math\n\ndef broken(:\n    pass\n", ["SyntaxError", "bad.py:3"]),
    "raises at import": (
        "from fairtune import plugin\n\n\ndef setup():\n    raise RuntimeError('no GPU here')\n\n\nsetup()\n",
        ["failed to import: RuntimeError: no GPU here (bad.py:5)"],
    ),
    "imports what is not installed": ("import fairtune_no_such_dependency\n", ["ModuleNotFoundError", "fairtune_no_such_dependency", "bad.py:1"]),
    "method clashes with a built-in": (
        "from fairtune import plugin\nplugin.method('mfd', terms=['mfd'], sampler='balanced', searched='lam')\n",
        ["method 'mfd' is already registered"],
    ),
    "term clashes": ("from fairtune import plugin\nplugin.term('mfd', lambda s, t, b, hp: 0)\n", ["loss term 'mfd' is already registered"]),
    "reserved term name": ("from fairtune import plugin\nplugin.term('ce', lambda s, t, b, hp: 0)\n", ["loss term name 'ce' is reserved"]),
    "hyperparameter clashes": (
        "from fairtune import plugin\nplugin.hyperparameter('lam', 'λ', positive=True)\n",
        ["hyperparameter 'lam' is already registered with other settings"],
    ),
    "hyperparameter not an identifier": ("from fairtune import plugin\nplugin.hyperparameter('step-size')\n", ["must be a Python identifier"]),
    "method names an unknown term": ("from fairtune import plugin\nplugin.method('m1', terms=['nope'])\n", ["unknown loss term 'nope'"]),
    "method names an unknown sampler": (
        "from fairtune import plugin\nplugin.method('m1', terms=['mmd'], sampler='nope', searched='lam')\n",
        ["method 'm1': unknown sampler 'nope'"],
    ),
    "method searches an unregistered hyperparameter": (
        "from fairtune import plugin\nplugin.method('m1', terms=['mmd'], sampler='balanced', searched='nope')\n",
        ["unknown hyperparameter 'nope'"],
    ),
    "term reads an unregistered hyperparameter": (
        "from fairtune import plugin\nplugin.term('t1', lambda s, t, b, hp: 0, reads=('nope',))\n", ["unknown hyperparameter 'nope'"],
    ),
    "bad space dict": (
        "from fairtune import plugin\nplugin.method('m1', terms=['mmd'], sampler='balanced', searched='lam')\n"
        "plugin.space('m1', {'method': 'm1', 'parameter': 'lam', 'distribution': 'uniform', 'low': 1, 'high': 2, 'default': 1})\n",
        ["the search space registered for m1: key 'distribution' is 'uniform'"],
    ),
    "space dict outside its range": (
        "from fairtune import plugin\nplugin.method('m1', terms=['mmd'], sampler='balanced', searched='lam')\n"
        "plugin.space('m1', {'method': 'm1', 'parameter': 'lam', 'distribution': 'loguniform', 'low': 1, 'high': 2, 'default': 5})\n",
        ["key 'default' value 5.0 lies outside the searched space"],
    ),
    "trained term without a name": (
        "from fairtune import plugin\n\n@plugin.trained_term\nclass T(plugin.TrainedTerm):\n    pass\n",
        ["trained term T needs a class attribute name"],
    ),
    "dataset lacking the contract": ("from fairtune import plugin\nplugin.dataset('toy', object())\n", ["dataset 'toy' lacks info, EXPECTED, locate, load"]),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_broken_plugin_is_exit_2_and_one_line_naming_its_file(case, tmp_path, capsys):
    path = write_plugin(tmp_path, FAILURES[case][0])
    code = main(["list", "--plugin", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, f"plugin {path.resolve()}", *FAILURES[case][1])
    assert not [name for name in sys.modules if name.startswith("fairtune_plugin_bad_")]  # nothing half-imported stays


@pytest.mark.parametrize("command", [["list"], ["train", "--method", "scratch", "--dataset", "imagefolder"]])
def test_a_missing_plugin_file_or_module_is_exit_2_and_one_line(command, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere" / "plugin.py"
    code = main([*command, "--plugin", str(missing)])
    assert_one_line_error(code, capsys.readouterr().err, f"--plugin {missing}: no such file")
    code = main([*command, "--plugin=fairtune_no_such_plugin_module"])
    assert_one_line_error(code, capsys.readouterr().err, "--plugin fairtune_no_such_plugin_module: no file or importable module of that name")
    monkeypatch.setenv(plugin.ENV, str(missing))
    assert_one_line_error(main(command), capsys.readouterr().err, f"FAIRTUNE_PLUGINS entry {missing}: no such file")


def test_a_folder_named_as_a_plugin_module_is_exit_2_and_loads_nothing(tmp_path, capsys, monkeypatch):
    """A folder without __init__.py imports as an empty namespace package: refused, not a silent no-op
    that would then ride along in FAIRTUNE_PLUGINS to every Ray worker."""
    (tmp_path / "results").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["list", "--plugin", "results"])
    assert_one_line_error(code, capsys.readouterr().err, "--plugin results: is a folder, not a plugin module")
    assert "results" not in sys.modules and "results" not in os.environ.get(plugin.ENV, "").split(os.pathsep)
    assert main(["list"]) == 0  # nothing of it was remembered
    for spec in ["", "..", ".x", "a..b"]:  # importlib's own errors for these are cryptic
        code = main(["list", f"--plugin={spec}"])
        assert_one_line_error(code, capsys.readouterr().err, f"--plugin {spec or repr('')}: no file or importable module of that name")


def test_fairtune_plugins_loads_a_plugin_for_every_command_as_absolute_paths(monkeypatch, capsys):
    """FAIRTUNE_PLUGINS alone (no --plugin) gives a command the plugin's methods and flags; a
    relative entry is passed on resolved, since Ray's workers run in folders of their own."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(plugin.ENV, os.path.join("examples", "groupdro.py"))
    assert main(["list"]) == 0
    assert "  groupdro " in capsys.readouterr().out
    assert build_parser().parse_args(["train", "--method", "groupdro", "--dataset", "imagefolder", "--eta", "0.2"]).eta == 0.2
    assert os.environ[plugin.ENV] == str(EXAMPLE)


def test_a_bad_yaml_beside_the_plugin_is_one_line_naming_it(tmp_path, capsys):
    write_plugin(tmp_path, EXAMPLE.read_text(), "groupdro.py")
    (tmp_path / "groupdro.yaml").write_text(yaml.safe_dump({**SPACE, "high": 1e-4}))
    code = main(["list", "--plugin", str(tmp_path / "groupdro.py")])
    assert_one_line_error(code, capsys.readouterr().err, f"{tmp_path / 'groupdro.yaml'}: key 'low' must be below high")


# -- GroupDRO's loss and weights against a plain loop -----------------------------------------------------


def reference_groupdro(steps, num_groups: int, eta: float):
    """Sagawa et al.'s Algorithm 1 written out: NumPy, float64, one loop over groups, q as it is."""
    q = np.full(num_groups, 1.0 / num_groups)
    trajectory, values = [], []
    for logits, labels, groups in steps:
        logits, labels, groups = (np.asarray(a, dtype=np.float64 if a.dtype.is_floating_point else np.int64) for a in (logits, labels, groups))
        shifted = logits - logits.max(1, keepdims=True)
        ce = np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(labels)), labels]
        losses = {}
        for g in range(num_groups):
            members = groups == g
            if members.any():
                losses[g] = ce[members].mean()
                q[g] = q[g] * math.exp(eta * losses[g])
        q = q / q.sum()
        trajectory.append(q.copy())
        values.append(sum(q[g] * loss for g, loss in losses.items()))
    return trajectory, values


def make_steps(num_groups: int, num_steps: int = 5, batch: int = 12, num_classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(num_steps):
        logits = torch.randn(batch, num_classes, generator=gen) * 2
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        groups = torch.randint(0, num_groups, (batch,), generator=gen)
        if step % 2:  # every other batch lacks the last group: its weight must not be updated by exp
            groups = groups % (num_groups - 1)
        steps.append((logits, labels, groups))
    return steps


@pytest.mark.parametrize("eta", [0.01, 0.7])
def test_groupdro_term_follows_the_papers_update(eta):
    module = groupdro()
    num_groups = 3
    steps = make_steps(num_groups)
    term = module.GroupDRO(SimpleNamespace(num_groups=num_groups), None, CPU)
    assert term.evaluation() == {"group_weights": pytest.approx([1 / 3] * 3)}
    expected_q, expected_loss = reference_groupdro(steps, num_groups, eta)
    for (logits, labels, groups), q, value in zip(steps, expected_q, expected_loss):
        logits = logits.clone().requires_grad_(True)
        student = ModelOutput(logits, None, None)
        batch = Batch(labels, groups, logits.shape[1], num_groups)
        loss = term.loss(student, None, batch, {"eta": eta})
        assert float(loss.detach()) == pytest.approx(value, abs=1e-6)
        # q is a constant of the step: the gradient is that of Σ q_g L_g with q fixed.
        (grad,) = torch.autograd.grad(loss, logits)
        fixed = torch.tensor(q, dtype=torch.float32)
        losses, _ = module.group_losses(logits, labels, groups, num_groups)
        (wanted,) = torch.autograd.grad((fixed * losses).sum(), logits)
        torch.testing.assert_close(grad, wanted, rtol=1e-5, atol=1e-7)
        term.loss(student, None, batch, {"eta": eta})  # a retried step (compile's eager fallback) moves q once
        term.step()
        np.testing.assert_allclose(term.q.numpy(), q, rtol=0, atol=1e-6)
        assert term.evaluation()["group_weights"] == pytest.approx(q.tolist(), abs=1e-6)
    assert abs(expected_q[-1][0] - 1 / 3) > (1e-4 if eta < 0.1 else 1e-2)  # the weights really moved


def test_groupdro_weights_survive_a_lead_that_underflows_the_literal_product():
    """A group far ahead for long has q_g = exp(-400): 0 in float32, where the literal product
    q_g·exp(η·L_g) would keep it for good. In log space it comes back when its loss does."""
    module = groupdro()
    term = module.GroupDRO(SimpleNamespace(num_groups=2), None, CPU)
    logits = ModelOutput(torch.tensor([[10.0, -10.0]] * 4), None, None)  # always predicts class 0
    groups = torch.tensor([0, 0, 1, 1])
    for labels, steps in ((torch.tensor([0, 0, 1, 1]), 20), (torch.tensor([1, 1, 0, 0]), 30)):
        # first group 0 right (L ≈ 0) and group 1 wrong (L ≈ 20), then the other way round
        for _ in range(steps):
            term.loss(logits, None, Batch(labels, groups, 2, 2), {"eta": 1.0})
            term.step()
        if steps == 20:
            assert float(term.q[0]) == 0.0 and math.isfinite(float(term.log_q[0]))
    assert float(term.q[0]) > 0.99


# -- the group-balanced sampler ------------------------------------------------------------------------


def test_group_balanced_batches_hold_equal_counts_of_every_group_whatever_the_classes():
    plan_of = groupdro().group_balanced_plan
    counts = {0: 50, 1: 7, 2: 20}
    groups = torch.tensor([g for g, n in counts.items() for _ in range(n)])
    labels = torch.arange(len(groups)) % 4  # classes unrelated to groups
    perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(1))
    labels, groups = labels[perm], groups[perm]
    plan = plan_of(labels, groups, 4, 3, 32, torch.Generator().manual_seed(0))
    assert plan.shape == (5, 30) and plan.dtype == torch.int64  # 32 // 3 = 10 per group; 50 // 10 batches
    for batch in plan:
        assert torch.bincount(groups[batch], minlength=3).tolist() == [10, 10, 10]
    seen = torch.bincount(plan.flatten(), minlength=len(groups))
    assert (seen[groups == 0] == 1).all()  # the largest group: each sample once
    assert (seen[groups == 1] >= 50 // 7).all() and (seen[groups == 2] >= 2).all()  # smaller ones oversampled

    # A group with no training sample is skipped; the others stay balanced.
    plan = plan_of(labels[groups != 1], groups[groups != 1], 4, 3, 32, torch.Generator().manual_seed(0))
    assert plan.shape == (5, 20)
    with pytest.raises(ValueError, match="smaller than the 3 groups"):
        plan_of(labels, groups, 4, 3, 2, torch.Generator())


def test_group_balanced_plan_draws_only_from_its_generator():
    plan_of = groupdro().group_balanced_plan
    groups = torch.tensor([0] * 30 + [1] * 9)
    labels = torch.zeros_like(groups)
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(1)
    first = plan_of(labels, groups, 1, 2, 8, gen)
    torch.manual_seed(2)  # the global RNG plays no part
    again = plan_of(labels, groups, 1, 2, 8, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    assert not torch.equal(plan_of(labels, groups, 1, 2, 8, gen), first)  # the next epoch: new draws
    assert plan_of is samplers.SAMPLERS["group-balanced"]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=2, max_size=5).filter(lambda s: sum(1 for n in s if n) >= 1),
    batch_size=st.integers(1, 64),
    seed=st.integers(0, 2**31),
)
def test_group_balanced_plan_properties(sizes, batch_size, seed):
    plan_of = groupdro().group_balanced_plan
    groups = torch.tensor([g for g, n in enumerate(sizes) for _ in range(n)], dtype=torch.int64)
    labels = torch.zeros_like(groups)
    per_group = batch_size // len(sizes)
    if per_group == 0 or max(sizes) < per_group:
        with pytest.raises(ValueError):
            plan_of(labels, groups, 1, len(sizes), batch_size, torch.Generator().manual_seed(seed))
        return
    plan = plan_of(labels, groups, 1, len(sizes), batch_size, torch.Generator().manual_seed(seed))
    present = [g for g, n in enumerate(sizes) if n]
    assert plan.shape == (max(sizes) // per_group, per_group * len(present))
    for batch in plan:
        counts = torch.bincount(groups[batch], minlength=len(sizes)).tolist()
        assert counts == [per_group if n else 0 for n in sizes]
    assert torch.equal(plan, plan_of(labels, groups, 1, len(sizes), batch_size, torch.Generator().manual_seed(seed)))


# -- the method in the training loop -------------------------------------------------------------------


def make_trainer(data, epochs: int = 2) -> Trainer:
    config = TrainConfig(method="groupdro", epochs=epochs, batch_size=24, eval_batch_size=60, hyperparameters={"eta": 0.5})
    return Trainer(config, data, None, CPU)


def test_groupdro_trains_and_resumes_exactly():
    groupdro()
    data = tiny_splits(n_train=150, n_eval=60, num_groups=3, num_classes=4, size=16)
    straight = make_trainer(data)
    straight.fit()
    last = straight.history[-1]
    assert {k for k in last if k.startswith("train/")} == {"train/loss", "train/groupdro"}  # no plain CE
    assert last["train/loss"] == pytest.approx(last["train/groupdro"])
    assert len(last["group_weights"]) == 3 and sum(last["group_weights"]) == pytest.approx(1.0)
    assert max(abs(w - 1 / 3) for w in last["group_weights"]) > 1e-3  # q moved

    first = make_trainer(data)
    first.run_epoch()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["terms"]["groupdro"]["log_q"].shape == (3,)
    torch.manual_seed(12345)  # the global RNG must come from the checkpoint, not from here
    resumed = make_trainer(data)
    resumed.load_state_dict(state)
    resumed.fit()
    assert resumed.history == straight.history
    assert torch.equal(resumed.trained["groupdro"].log_q, straight.trained["groupdro"].log_q)
    for a, b in zip(straight.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)


# -- search, final and report, as a user runs them --------------------------------------------------------


def fairtune(*argv: str, cwd: Path) -> tuple[str, int]:
    """A command in its own process and its own local Ray, with nothing in the environment naming the
    plugin: the workers can know it only from --plugin, through the job's environment. Its standard
    output and its process id."""
    env = {k: v for k, v in os.environ.items() if k != plugin.ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    with subprocess.Popen([sys.executable, "-m", "fairtune", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out, proc.pid


@pytest.mark.slow
def test_groupdro_goes_through_search_final_and_report_like_a_built_in(tmp_path, capsys):
    from tests.fixtures.imagefolder import write_imagefolder

    data, results = tmp_path / "data", tmp_path / "results"
    write_imagefolder(data, {(0, 0): 45, (1, 0): 30, (0, 1): 15, (1, 1): 30}, sizes=((16, 16), (20, 16)))
    given = ["--plugin", str(EXAMPLE), "--dataset", "imagefolder", "--data-dir", str(data), "--results-dir", str(results), "--device", "cpu"]
    out, driver = fairtune("search", *given, "--method", "groupdro", "--image-size", "16", "--epochs", "2", "--num-samples", "2",
                      "--batch-size", "16", "--cpus-per-trial", "1", cwd=tmp_path)
    folder = results / "imagefolder" / "search" / "groupdro"
    best = json.loads((folder / "best.json").read_text())
    assert best["searched"] == "eta" and set(best["hyperparameters"]) == {"eta"}
    assert SPACE["low"] <= best["hyperparameters"]["eta"] <= SPACE["high"]
    trials = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 2 and set(trials["status"]) == {"COMPLETED"}
    assert trials["eta"].iloc[0] == pytest.approx(SPACE["default"])  # the space's start value goes first
    assert "best: eta=" in out
    # The trials ran in Ray's worker processes, which imported the plugin from FAIRTUNE_PLUGINS.
    pids = {json.loads(line)["pid"] for path in folder.glob("trials/*/epochs.jsonl") for line in path.read_text().splitlines()}
    assert pids and driver not in pids

    fairtune("final", *given, "--seeds", "0", "1", cwd=tmp_path)  # no --method: every search found, plus the teachers
    for method in ("scratch", "groupdro"):
        for seed in (0, 1):
            record = json.loads((results / "imagefolder" / "final" / method / f"seed{seed}.json").read_text())
            assert record["method"] == method and record["seed"] == seed
            assert 0 <= record["test"]["accuracy"] <= 100 and record["test"]["deo_a"] >= 0
            if method == "groupdro":
                assert record["config"]["eta"] == pytest.approx(best["hyperparameters"]["eta"])
                assert len(record["test"]["group_weights"]) == 2  # the trained term ran in the Ray task

    assert main(["report", "--plugin", str(EXAMPLE), "--dataset", "imagefolder", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("| GroupDRO ")]
    assert "| η=" in row and "| Teacher " in out
    table = pd.read_csv(results / "imagefolder" / "table.csv").set_index("method")
    assert list(table.index) == ["scratch", "groupdro"] and table.loc["groupdro", "hyperparameters"].startswith("η=")
    assert table.loc["groupdro", "seeds"] == 2


def test_a_batch_size_a_plugin_sampler_cannot_fill_is_refused_before_training(data_dir, tmp_path, capsys):
    argv = ["train", "--plugin", str(EXAMPLE), "--method", "groupdro", "--eta", "0.1", "--dataset", "fmnist-s",
            "--data-dir", str(data_dir), "--train-size", "200", "--eval-size", "100", "--results-dir", str(tmp_path)]
    assert main([*argv, "--batch-size", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--batch-size 1 does not fit groupdro's sampler 'group-balanced'" in err and "smaller than the 2 groups" in err
    assert not (tmp_path / "fmnist-s" / "train").exists()


@pytest.mark.parametrize("module", ["fairtune.plugin", "fairtune.terms", "fairtune.hyperparameters", "fairtune.methods",
                                    "fairtune.data", "fairtune.data.loader", "fairtune.spaces", "fairtune.cli"])
def test_each_registry_module_imports_first_in_a_fresh_interpreter(module):
    """The registries and the plugin API import each other lazily; any import order must work."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
