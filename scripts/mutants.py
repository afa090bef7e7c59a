"""The mutation operators of ``make mutate`` (scripts/mutate.py), on a module's syntax tree: which
nodes change, into what, and the mutants of a module's source (ids stable for an unchanged source).
Docstrings, the messages of ``raise`` statements, f-strings, imports and annotations are never
mutated."""

from __future__ import annotations

import ast
import copy
import hashlib
from dataclasses import dataclass

BINOP_SWAP = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
COMPARE_FLIP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
BOOLOP_SWAP = {ast.And: ast.Or, ast.Or: ast.And}
NO_SWAP = {"isinstance", "issubclass", "getattr", "setattr", "hasattr", "super"}  # a TypeError
NAME_SWAP = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum"}


@dataclass
class Mutant:
    id: str
    module: str
    line: int
    operator: str
    before: str
    after: str
    index: int  # the n-th mutation point of the module, in walk order
    choice: int  # which of the point's mutations


def skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes not to mutate: docstrings, raise statements, f-strings, annotations,
    ``if __name__ == "__main__"`` blocks, ``__all__``."""
    skip: set[int] = set()

    def mark(node):
        for sub in ast.walk(node):
            skip.add(id(sub))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                mark(body[0])
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Import, ast.ImportFrom)):
            mark(node)
        if isinstance(node, (ast.AnnAssign, ast.arg)) and node.annotation is not None:
            mark(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            mark(node.returns)
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            mark(node)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            mark(node)
    return skip


def is_container(node) -> bool:
    """A string, f-string, list, tuple or dict literal (its + or argument swap only raises)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (str, bytes))
    return isinstance(node, (ast.JoinedStr, ast.List, ast.Tuple, ast.Dict, ast.ListComp))


def mutations(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """The mutations of one node: (operator name, replacement node)."""
    out = []
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP_SWAP:
        if any(
            map(
                is_container,
                (
                    getattr(node, "left", None),
                    node.value if isinstance(node, ast.AugAssign) else node.right,
                ),
            )
        ):
            return out  # string or list concatenation: a TypeError, not a plausible bug
        new = copy.deepcopy(node)
        new.op = BINOP_SWAP[type(node.op)]()
        out.append(("arithmetic", new))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARE_FLIP:
                new = copy.deepcopy(node)
                new.ops[i] = COMPARE_FLIP[type(op)]()
                out.append(("comparison", new))
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = BOOLOP_SWAP[type(node.op)]()
        out.append(("boolean", new))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
        out.append(("negation dropped", copy.deepcopy(node.operand)))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        if isinstance(node.value, bool):
            value = not node.value
        elif isinstance(node.value, int):
            value = node.value + 1
        else:
            value = 1.0 if node.value == 0.0 else node.value * 2
        out.append(("constant", ast.Constant(value)))
    elif isinstance(node, ast.Name) and node.id in NAME_SWAP and isinstance(node.ctx, ast.Load):
        out.append(("min/max", ast.Name(NAME_SWAP[node.id], ast.Load())))
    elif isinstance(node, ast.Attribute) and node.attr in NAME_SWAP:
        new = copy.deepcopy(node)
        new.attr = NAME_SWAP[node.attr]
        out.append(("min/max", new))
    elif isinstance(node, ast.Call):
        args = node.args
        name = node.func.id if isinstance(node.func, ast.Name) else ""
        plain = not any(isinstance(a, ast.Starred) or is_container(a) for a in args[:2])
        if len(args) >= 2 and plain and name not in NO_SWAP:
            if ast.unparse(args[0]) != ast.unparse(args[1]):
                new = copy.deepcopy(node)
                new.args[0], new.args[1] = new.args[1], new.args[0]
                out.append(("arguments swapped", new))
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        out.append(("statement dropped", ast.Pass()))
    elif isinstance(node, ast.AugAssign):
        out.append(("statement dropped", ast.Pass()))
    return out


def mutation_points(tree: ast.AST):
    """(index, node, [(operator, replacement)]) of every mutable node, in walk order."""
    skip = skipped_nodes(tree)
    index = 0
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        found = mutations(node)
        if found:
            yield index, node, found
            index += 1


class Replace(ast.NodeTransformer):
    def __init__(self, target: int, replacement: ast.AST):
        self.target, self.replacement = target, replacement

    def visit(self, node):
        if id(node) == self.target:
            return ast.copy_location(self.replacement, node)
        return self.generic_visit(node)


def mutants_of(module: str, source: str) -> list[Mutant]:
    """Every mutant of ``source`` (the file ``module``), in walk order; an id hashes the module, the
    line, the change and its place, so it names the same mutant until that code changes."""
    found = []
    for index, node, options in mutation_points(ast.parse(source, module)):
        for choice, (operator, new) in enumerate(options):
            before = ast.unparse(node).splitlines()[0]
            after = ast.unparse(new).splitlines()[0] if not isinstance(new, ast.Pass) else "pass"
            key = f"{module}:{node.lineno}:{operator}:{before}->{after}:{index}:{choice}"
            digest = hashlib.sha1(key.encode()).hexdigest()[:8]
            found.append(
                Mutant(digest, module, node.lineno, operator, before, after, index, choice)
            )
    return found


def mutated(mutant: Mutant, source: str) -> str | None:
    """``source`` with ``mutant`` applied; None if it has no such mutation point (it changed)."""
    tree = ast.parse(source, mutant.module)
    for index, node, options in mutation_points(tree):
        if index == mutant.index:
            tree = Replace(id(node), options[mutant.choice][1]).visit(tree)
            return ast.unparse(ast.fix_missing_locations(tree))
    return None
