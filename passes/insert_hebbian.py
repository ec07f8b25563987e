"""insert_hebbian: one Hebbian update node, with its rule settings, per plastic layer."""

from __future__ import annotations

from ghlc.graph import HebbianRule, LayerGraph, hebb_key


def rule_for(cfg, module: str) -> HebbianRule:
    return HebbianRule(
        temperature=cfg.temperature_for(module), competition=cfg.competition,
        competition_scope=cfg.competition_scope, local_rule=cfg.local_rule,
        global_signal=cfg.global_signal, sample_fraction=cfg.sample_fraction,
        normalisation=cfg.normalisation, sample_over=cfg.sample_over,
        precision=cfg.hebbian_precision,
    )


def insert_hebbian(lg: LayerGraph) -> LayerGraph:
    g = lg.copy_graph()
    for n in [n for n, d in g.nodes(data=True) if d["type"] == "hebbian"]:
        g.remove_node(n)
    for info in lg.plastic():
        k = hebb_key(info.name)
        g.add_node(k, type="hebbian", rule=rule_for(lg.config, info.module))
        g.add_edge(info.name, k, type="update")
    return lg.evolve(g=g)

