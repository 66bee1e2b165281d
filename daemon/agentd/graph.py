"""The dependency graph: inputs -> the renders that read them.

Nodes are strings with a kind prefix (``template:``, ``key:``, ``catalog:``, ``trait:``,
``meta:`` for inputs; ``section:``, ``compose:``, ``fragment:`` for renders). An edge
``input -> render`` means the render read that input the last time it ran; edges
``template:A -> template:B`` say B references A statically (``jinja2.meta``). Runtime edges
are replaced wholesale after every render, so the graph never keeps a dependency that the
current output does not have.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import networkx as nx

CATALOG = "catalog"  # membership of the catalog (which agents exist, in which order)
RELATIONS = "catalog-relations"  # ids, tags and handoffs of every agent: who is related to whom
TRAIT_KINDS = "trait-kinds"  # which trait kinds the library has (every agent's `traits` lists them all)


def template_node(name: str) -> str:
    return f"template:{name}"


def key_node(agent_id: str, key: str) -> str:
    return f"key:{agent_id}:{key}"


def key_prefix(agent_id: str) -> str:
    return f"key:{agent_id}:"


def section_list_node(agent_id: str) -> str:
    """An agent's resolved section list (ids, numbers, titles, in order): what ``sections``
    gives its templates and what its composition joins. It can change without its source
    changing (the default list follows the section templates and ``agentd.toml``)."""
    return f"section-list:{agent_id}"


def catalog_node(agent_id: str) -> str:
    return f"catalog:{agent_id}"


def trait_prefix(ref: str) -> str:
    return f"trait:{ref}:"


def trait_key_node(ref: str, key: str) -> str:
    """One top-level key of a trait ("*": all of them, for a render that iterated it)."""
    return trait_prefix(ref) + key


def meta_node(agent_id: str, section: str) -> str:
    return f"meta:{agent_id}/{section}"


def section_node(agent_id: str, section: str) -> str:
    return f"section:{agent_id}/{section}"


def compose_node(agent_id: str) -> str:
    return f"compose:{agent_id}"


def skeleton_unit(agent_id: str) -> str:
    """An agent's skeleton in the persistent store (not a graph node: what it read invalidates
    the agent's composition, which drops the skeleton)."""
    return f"skeleton:{agent_id}"


def fragment_node(key: str) -> str:
    return f"fragment:{key}"


RENDER_KINDS = ("section:", "compose:", "fragment:")
_TEMPLATE = "template:"


class Node(NamedTuple):
    """A node id taken apart, the one place that knows how they are spelled: ``name`` is the
    agent, template, trait reference or fragment key; ``part`` the key or section in it."""

    kind: str
    name: str
    part: str = ""


#: Kinds whose name carries a part after this separator (``key:AGENT:KEY``, ``section:AGENT/ID``).
_PART_SEPARATORS = {"key": ":", "trait": ":", "meta": "/", "section": "/"}


def parse(node: str) -> Node:
    """The inverse of the ``*_node`` functions (``catalog``, ``catalog-relations`` and
    ``trait-kinds`` parse to their own kind with an empty name)."""
    kind, _, rest = node.partition(":")
    separator = _PART_SEPARATORS.get(kind)
    if separator is None:
        return Node(kind, rest)
    name, _, part = rest.partition(separator)
    return Node(kind, name, part)


def is_template(node: str) -> bool:
    return node.startswith(_TEMPLATE)


def template_name(node: str) -> str:
    return node[len(_TEMPLATE) :]


def is_render(node: str) -> bool:
    return node.startswith(RENDER_KINDS)


class DepGraph:
    """A thin layer over ``networkx.DiGraph`` that knows which edges are static and which
    were traced."""

    def __init__(self) -> None:
        # Imported here: networkx takes ~70 ms to import, and `agentd build --jobs` starts its
        # parsing workers before anything needs a graph.
        import networkx as nx

        self.g: nx.DiGraph = nx.DiGraph()

    # -- static template references -------------------------------------------------------
    def set_template_refs(self, name: str, referenced: Iterable[str]) -> None:
        """Replace the static references of template ``name`` (from ``jinja2.meta``)."""
        node = template_node(name)
        for pred in [p for p in self.g.predecessors(node)] if node in self.g else []:
            if is_template(pred):
                self.g.remove_edge(pred, node)
        self.g.add_node(node)
        for ref in referenced:
            self.g.add_edge(template_node(ref), node)

    def template_closure(self, names: Iterable[str]) -> set[str]:
        """The given template nodes plus every template that references one of them,
        transitively: a change to a macro library reaches every template importing it."""
        out: set[str] = set()
        stack = [template_node(n) for n in names]
        while stack:
            node = stack.pop()
            if node in out:
                continue
            out.add(node)
            if node in self.g:
                stack.extend(s for s in self.g.successors(node) if is_template(s))
        return out

    # -- traced render inputs -------------------------------------------------------------
    def set_inputs(self, render: str, inputs: Iterable[str]) -> None:
        """Replace everything ``render`` depends on with what its last run read."""
        inputs = set(inputs)
        if render in self.g:
            # Re-renders mostly read what they read before: a set comparison (~2 µs) saves
            # the edge removal and re-insertion (~150 µs for a section's ~50 inputs).
            if self.g.pred[render].keys() == inputs:
                return
            self.g.remove_edges_from(list(self.g.in_edges(render)))
        self.g.add_node(render)
        self.g.add_edges_from((node, render) for node in inputs)

    def remove(self, nodes: Iterable[str]) -> None:
        """Drop renders, and the inputs only they read (so the graph does not grow with every
        key ever typed). Template nodes stay: they carry static references."""
        nodes = [n for n in nodes if n in self.g]
        inputs = {p for n in nodes for p in self.g.predecessors(n)}
        self.g.remove_nodes_from(nodes)
        self.g.remove_nodes_from([n for n in inputs if n in self.g and self.g.degree(n) == 0 and not is_template(n)])

    def readers(self, inputs: Iterable[str]) -> set[str]:
        """Renders that read any of ``inputs`` (templates expanded through static refs)."""
        inputs = set(inputs)
        templates = [template_name(n) for n in inputs if is_template(n)]
        inputs |= self.template_closure(templates)
        out: set[str] = set()
        for node in inputs:
            if node in self.g:
                out.update(s for s in self.g.successors(node) if is_render(s))
        return out

    # -- export ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        nodes = [{"id": n, "kind": parse(n).kind} for n in sorted(self.g)]
        edges = [
            {"source": u, "target": v, "type": "static" if is_template(v) else "traced"}
            for u, v in sorted(self.g.edges)
        ]
        return {"nodes": nodes, "edges": edges}

    def to_dot(self) -> str:
        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = ["digraph agentd {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
        for n in sorted(self.g):
            kind = parse(n).kind
            lines.append(f"  {q(n)} [group={q(kind)}];")
        for u, v in sorted(self.g.edges):
            style = " [style=dashed]" if is_template(v) else ""
            lines.append(f"  {q(u)} -> {q(v)}{style};")
        lines.append("}")
        return "\n".join(lines) + "\n"
