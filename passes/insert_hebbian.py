"""insert_hebbian: one Hebbian update node, with its rule settings, per plastic layer."""

from __future__ import annotations

from ghlc.config import GHLConfig
from ghlc.graph import HebbianRule, LayerGraph, Role, hebb_key

from .base import PassBase, PassResult, changed


def rule_for(cfg: GHLConfig, module: str) -> HebbianRule:
    """The rule settings of the layer at module path ``module`` under ``cfg``."""
    return HebbianRule(
        temperature=cfg.temperature_for(module),
        competition=cfg.competition,
        competition_scope=cfg.competition_scope,
        local_rule=cfg.local_rule,
        sample_fraction=cfg.sample_fraction,
        normalisation=cfg.normalisation,
        sample_over=cfg.sample_over,
        precision=cfg.hebbian_precision,
    )


class InsertHebbian(PassBase):
    """A Hebbian node (rule from the config) with an ``update`` edge from each plastic
    parameter's layer node; Hebbian nodes of an earlier run are replaced."""

    name = "insert_hebbian"

    def call(self, lg: LayerGraph) -> PassResult:
        g = lg.copy_graph()
        for n in [n for n, d in g.nodes(data=True) if d["type"] == "hebbian"]:
            g.remove_node(n)
        for info in lg.plastic():
            k = hebb_key(info.name)
            g.add_node(k, type="hebbian", rule=rule_for(lg.config, info.module))
            g.add_edge(info.name, k, type="update")
        out = lg.evolve(g=g)
        return PassResult(out, changed(lg, out))

    def ensures(self, lg: LayerGraph) -> list[str]:
        """Hebbian nodes exactly on the plastic parameters."""
        plastic = {hebb_key(i.name) for i in lg.layers() if i.role is Role.PLASTIC}
        have = set(lg.hebbian_nodes())
        return [
            f"plastic parameter {k.removeprefix('hebbian:')} has no Hebbian node"
            for k in sorted(plastic - have)
        ] + [f"{k} is not on a plastic layer" for k in sorted(have - plastic)]


insert_hebbian = InsertHebbian()
