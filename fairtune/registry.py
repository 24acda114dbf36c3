"""Looking a name up in one of fairtune's registries (hyperparameters, terms, datasets ...)."""

from collections.abc import Mapping

from fairtune.errors import UserError


def lookup(table: Mapping, name: str, what: str, valid: str = "known"):
    """``table[name]``, loading the plugins first on a miss (a Ray worker meets a plugin's names
    before anything imported it); an unknown name is one UserError listing the known ones."""
    if name not in table:
        from fairtune.plugin import ensure_loaded  # here, not at the top: the plugin API imports the registries

        ensure_loaded()
    try:
        return table[name]
    except KeyError:
        raise UserError(f"unknown {what} '{name}'; {valid}: {', '.join(table)}") from None
