"""The README's support grid, made from the family table: one row per model (a family, or each root
class a family lists), one column per node, each cell read off the same rows and rules the nodes
check before any work."""
from .slicing.registry import FAMILIES, plain_root, rehash_refusal, short_name

NODES = ("Feature Slicer / Operator Grouper", "VAE Slicer", "Memory Planner", "Step Rehash", "DualParal")
START, END = "<!-- support grid: made by `python -m core.support_grid` from the family table -->", "<!-- end of grid -->"


def _cells(family, caller) -> tuple:
    refused = caller is not None and caller.refused
    return (family.input == "MODEL" and not refused,
            family.input == "VAE",
            family.step_inputs is not None and not refused and plain_root(family, caller),
            not rehash_refusal(family, caller),
            bool(family.pipeline_parts) and plain_root(family, caller))


def rows() -> list:
    """(model, (accepted by each of NODES)) for every model the table names."""
    found = []
    for family in FAMILIES:
        if family.input == "diffusers":
            continue  # the Python API's, not a node's
        for caller in family.callers or (None,):
            title = f"{caller.title} (`{caller.name}`)" if caller else short_name(family)
            found.append((title, _cells(family, caller)))
    return found


def markdown() -> str:
    lines = [START, "", f"| model | {' | '.join(NODES)} |", "|---" * (len(NODES) + 1) + "|"]
    lines += [f"| {title} | {' | '.join('yes' if accepted else '-' for accepted in cells)} |" for title, cells in rows()]
    return "\n".join(lines + ["", END])


if __name__ == "__main__":
    print(markdown())
