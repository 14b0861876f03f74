"""Copy resnet/'s utils.py, and the shared definitions of its train.py and predict.py, to the
other four folders.

    $ python tests/sync_shared.py           # after editing shared code in resnet/
    $ python tests/sync_shared.py --check   # list what differs, change nothing (exit 1 if any)

The five folders repeat their shared code on purpose (copy one folder and it still runs), and
the tests hold the copies identical. utils.py is copied whole. In train.py and predict.py each
shared top-level function or class (and the `if __name__ == "__main__":` block) is replaced by
resnet's text, and a shared definition that a file lacks is inserted after the one that
precedes it in resnet's file. Family-specific definitions, module constants and the import
block are never touched: add a new import by hand (ruff names a missing one).
"""

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("lenet", "alexnet", "vgg", "googlenet", "resnet")
REFERENCE = "resnet"
# Definitions that are each folder's own; everything else at the top level is shared.
FAMILY_SPECIFIC = {
    "train.py": {"add_model_args", "build_model", "compute_loss", "read_pretrained"},
    "predict.py": {"add_model_args", "build_model"},
}
# lenet's load_datasets wraps the shared image-folder loader (for CIFAR-10 and Fashion-MNIST),
# which lenet therefore names load_image_folders.
RENAMED = {("lenet", "train.py"): {"load_datasets": "load_image_folders"}}
OWN = {("lenet", "train.py"): {"load_datasets"}}
MAIN_BLOCK = "__main__"


def top_level(source: str) -> dict[str, tuple[int, int]]:
    """Each top-level function/class (and the main block) -> its (first, last) line, 1-based."""
    spans = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            spans[node.name] = (first, node.end_lineno)
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            spans[MAIN_BLOCK] = (node.lineno, node.end_lineno)
    return spans


def shared_names(script: str) -> list[str]:
    """The shared definitions, in the order of the reference file."""
    spans = top_level((REPO / REFERENCE / script).read_text())
    return [name for name in spans if name not in FAMILY_SPECIFIC[script]]


def definition_text(source: str, span: tuple[int, int]) -> list[str]:
    return source.splitlines(keepends=True)[span[0] - 1 : span[1]]


def synced(family: str, script: str) -> str:
    """The text family/script should have: its own parts, and the reference's shared parts."""
    sources = {name: (REPO / REFERENCE / name).read_text() for name in FAMILY_SPECIFIC}
    ref_spans = {name: top_level(text) for name, text in sources.items()}
    text = (REPO / family / script).read_text()
    renamed = RENAMED.get((family, script), {})
    previous = None
    for name in shared_names(script):
        own_name = renamed.get(name, name)
        new = definition_text(sources[script], ref_spans[script][name])
        if own_name != name:
            new[0] = new[0].replace(f"def {name}(", f"def {own_name}(", 1)
        lines = text.splitlines(keepends=True)
        spans = top_level(text)
        if own_name in spans:
            first, last = spans[own_name]
            lines[first - 1 : last] = new
        else:  # a new shared definition: after the shared one that precedes it in resnet/
            at = spans[renamed.get(previous, previous)][1] if previous else len(lines)
            lines[at:at] = ["\n", "\n", *new]
        text = "".join(lines)
        previous = name
    # A shared definition that resnet/ no longer has goes from the other folders too.
    kept = {renamed.get(name, name) for name in shared_names(script)}
    kept |= FAMILY_SPECIFIC[script] | OWN.get((family, script), set())
    for name, (first, last) in sorted(top_level(text).items(), key=lambda kv: -kv[1][0]):
        if name not in kept:
            lines = text.splitlines(keepends=True)
            while first > 2 and not lines[first - 2].strip():
                first -= 1  # the blank lines before it
            del lines[first - 1 : last]
            text = "".join(lines)
    return text


def shared_definitions(family: str, script: str) -> dict[str, str]:
    """Shared name -> its syntax tree dump in family/script (None where missing): for tests."""
    source = (REPO / family / script).read_text()
    trees = {}
    for node in ast.parse(source).body:
        name = getattr(node, "name", MAIN_BLOCK if isinstance(node, ast.If) else None)
        if name is not None:
            trees[name] = node
    renamed = RENAMED.get((family, script), {})
    found = {}
    for name in shared_names(script):
        node = trees.get(renamed.get(name, name))
        if node is not None and renamed.get(name):
            node.name = name
        found[name] = None if node is None else ast.dump(node)
    # Definitions that are neither shared nor the folder's own: left over from older code.
    own = FAMILY_SPECIFIC[script] | OWN.get((family, script), set()) | set(renamed.values())
    for name, node in trees.items():
        if name not in found and name not in own:
            found[name] = ast.dump(node)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report (default: rewrite)")
    args = parser.parse_args()
    stale = []
    for family in (f for f in FAMILIES if f != REFERENCE):  # utils.py: byte for byte
        path = REPO / family / "utils.py"
        if not path.is_file() or path.read_bytes() != (REPO / REFERENCE / "utils.py").read_bytes():
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_bytes((REPO / REFERENCE / "utils.py").read_bytes())
    for script in FAMILY_SPECIFIC:
        for family in FAMILIES:
            if family == REFERENCE and script == "train.py":
                continue
            path = REPO / family / script
            new = synced(family, script)
            if new != path.read_text():
                stale.append(path.relative_to(REPO))
                if not args.check:
                    path.write_text(new)
    verb = "differ from resnet's" if args.check else "updated"
    for path in stale:
        print(f"{path}: {verb}")
    if not stale:
        print("the shared definitions are identical in all five folders")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
