"""Which graph of a model holds each weight, kept true through graphsurgeon's export.

`If`/`Loop`/`Scan` bodies may read initializers of an enclosing graph (PyTorch exports do:
silero-vad's two sample-rate branches read the main graph's weights). graphsurgeon exports
every constant a graph's nodes read as that graph's own initializer, so such weights would be
copied into every body that reads them, and the model would grow. Here each weight has a
*home*, the graph that defined it in the input (for a site's new K and L: the home of the
weight they replace); after the export, every initializer is moved back to its home, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from graphopt.backends.onnx_io import iter_graphs


@dataclass
class _Scope:
    graph: gs.Graph
    original: onnx.GraphProto
    parent: _Scope | None
    own: set = field(default_factory=set)
    """Initializer names this graph defines in the input."""


class Scopes:
    """The graphs of one imported model, paired with the input's graphs, and weight homes."""

    def __init__(self, model: onnx.ModelProto, graph: gs.Graph):
        self.scopes: list[_Scope] = []
        self._pair(graph, model.graph, None)
        self._homes: dict[int, tuple[gs.Constant, _Scope]] = {}
        for scope in self.scopes:
            for tensor in scope.graph.tensors().values():
                if isinstance(tensor, gs.Constant) and id(tensor) not in self._homes:
                    home = self._definer(scope, tensor.name)
                    if home is not None:
                        self._homes[id(tensor)] = (tensor, home)

    def _pair(self, graph: gs.Graph, proto: onnx.GraphProto, parent: _Scope | None) -> None:
        scope = _Scope(graph, proto, parent, {t.name for t in proto.initializer})
        self.scopes.append(scope)
        for node, node_proto in zip(graph.nodes, proto.node):  # the importer keeps the order
            for attr in node_proto.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    self._pair(node.attrs[attr.name], attr.g, scope)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub, sub_proto in zip(node.attrs[attr.name], attr.graphs):
                        self._pair(sub, sub_proto, scope)

    @staticmethod
    def _definer(scope: _Scope | None, name: str) -> _Scope | None:
        while scope is not None and name not in scope.own:
            scope = scope.parent
        return scope

    def _scope_of(self, graph: gs.Graph) -> _Scope:
        return next(s for s in self.scopes if s.graph is graph)

    def home_like(self, new: list[gs.Constant], weight, graph: gs.Graph) -> None:
        """New weights live where `weight` (the one they replace) lives: its defining graph,
        the graph of the Constant node that makes it, or else `graph`."""
        home = self._homes.get(id(weight), (None, None))[1]
        if home is None and len(weight.inputs) == 1:
            producer = weight.inputs[0]
            home = next((s for s in self.scopes if any(n is producer for n in s.graph.nodes)), None)
        home = home or self._scope_of(graph)
        for tensor in new:
            self._homes[id(tensor)] = (tensor, home)

    def export(self, graph: gs.Graph, removed: set[str]) -> onnx.ModelProto:
        """graphsurgeon's export, with every initializer in its home graph once, and the
        input's initializers no node reads kept (unless in `removed`: weights of replaced
        convs)."""
        names = [s.graph.name for s in self.scopes]
        for i, scope in enumerate(self.scopes):
            scope.graph.name = f"pwgroup-scope-{i}"
        try:
            new = gs.export_onnx(graph, do_type_check=False)
        finally:
            for scope, name in zip(self.scopes, names):
                scope.graph.name = name
        exported = {g.name: g for g in iter_graphs(new.graph)}
        protos = [exported[f"pwgroup-scope-{i}"] for i in range(len(self.scopes))]
        moved: dict[int, list[onnx.TensorProto]] = {}
        for scope, proto, name in zip(self.scopes, protos, names):
            proto.name = name
            used = scope.graph.tensors()
            kept = []
            for tensor in proto.initializer:
                home = self._homes.get(id(used.get(tensor.name)), (None, scope))[1]
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                (kept if home is scope else moved.setdefault(id(home), [])).append(copy)
            del proto.initializer[:]
            proto.initializer.extend(kept)
        for scope, proto in zip(self.scopes, protos):
            present = {t.name for t in proto.initializer}
            for tensor in moved.get(id(scope), []) + [
                t for t in scope.original.initializer if t.name not in removed
            ]:
                if tensor.name not in present:
                    proto.initializer.append(tensor)
                    present.add(tensor.name)
        return new
