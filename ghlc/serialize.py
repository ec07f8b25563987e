"""LayerGraph <-> JSON (no code, only data)."""

from __future__ import annotations

import dataclasses
import json

import networkx as nx

from .config import GHLConfig
from .graph import HebbianRule, LayerGraph, LayerInfo, Role


def graph_to_json(lg: LayerGraph) -> str:
    nodes = []
    for n, d in lg.g.nodes(data=True):
        item = {"id": n, "type": d["type"]}
        if d["type"] == "layer":
            info = dataclasses.asdict(d["info"])
            info["role"] = d["info"].role.value
            item["info"] = info
        elif d["type"] == "hebbian":
            item["rule"] = dataclasses.asdict(d["rule"])
        elif d["type"] == "global_sign":
            item["signal"] = d["signal"]
        nodes.append(item)
    edges = [{"u": u, "v": v, "type": d["type"]} for u, v, d in lg.g.edges(data=True)]
    return json.dumps(
        {
            "nodes": nodes,
            "edges": edges,
            "config": lg.config.to_dict(),
            "capture": lg.capture,
            "capture_errors": [list(e) for e in lg.capture_errors],
        }
    )


def graph_from_json(text: str) -> LayerGraph:
    d = json.loads(text)
    g: nx.DiGraph[str] = nx.DiGraph()
    for item in d["nodes"]:
        attrs = {"type": item["type"]}
        if item["type"] == "layer":
            info = dict(item["info"])
            info["role"] = Role(info["role"])
            for k in ("weight_shape", "in_shape", "out_shape"):
                info[k] = tuple(info[k])
            attrs["info"] = LayerInfo(**info)
        elif item["type"] == "hebbian":
            attrs["rule"] = _rule(item["rule"])
        elif item["type"] == "global_sign":
            attrs["signal"] = item["signal"]
        g.add_node(item["id"], **attrs)
    for e in d["edges"]:
        g.add_edge(e["u"], e["v"], type=e["type"])
    return LayerGraph(
        g=g,
        config=GHLConfig.from_dict(d["config"]),
        capture=d["capture"],
        capture_errors=tuple(tuple(e) for e in d["capture_errors"]),
    )


def _rule(fields: dict) -> HebbianRule:
    """A HebbianRule from JSON. Artifacts written before the global signal moved to the
    global-sign node also stored it in every rule: that copy is dropped (the node's wins)."""
    return HebbianRule(**{k: v for k, v in fields.items() if k != "global_signal"})
