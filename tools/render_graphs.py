"""Render the pictures of docs/architecture.md from the code: the pipeline, and the FX graph of a small transformer
block as traced, after inject and after fold.

    python tools/render_graphs.py [--out docs/images]

Needs networkx (a lora_fx dependency) and matplotlib (`pip install matplotlib`). Writes:
  pipeline.png            the passes and the data between them
  fx_traced.png           the block's graph as traced (torch.fx symbolic tracing)
  fx_injected.png         after inject: a LoRA branch and an add beside each adapted site
  fx_folded.png           after fold: the traced graph again, the adapted sites' weights now W0 + (alpha/r)·B·A
The graphs are the real ones: the block is traced, adapted and folded by lora_fx, and each picture is drawn from the
GraphModule's nodes, in the same layout so they can be compared at a glance.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DPI = 110

# colours: one per kind of node
COLOURS = {
    "io": "#e8e8e8",        # placeholder / output
    "site": "#9ecae1",      # a linear-like site (weight W0)
    "folded": "#a1d99b",    # a site whose weight fold changed
    "lora": "#fdae6b",      # LoRA branch module (dropout -> A -> B -> ·alpha/r)
    "lora_add": "#fdd0a2",  # the add that joins the branch to the base output
    "op": "#ffffff",        # anything else
}


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        sys.exit(f"render_graphs needs {module}: pip install {module}")


# ------------------------------------------------------------------------------------------------ the block
def make_block():
    """A pre-norm transformer block: attention through q/k/v/o Linears and an MLP (up, gelu, down)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int = 16):
            super().__init__()
            self.ln = nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            h = self.ln(x)
            x = x + self.o(F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h)))
            return x + self.down(F.gelu(self.up(x)))

    torch.manual_seed(0)
    return Block().eval(), (torch.randn(2, 5, 16),)


def graphs():
    """(traced, adapted, folded) GraphModules of the block, and the rules used."""
    import torch

    import lora_fx
    from lora_fx import Rule
    from lora_fx.passes.trace import trace

    model, args = make_block()
    rules = [Rule(role=["attn.q", "attn.v"], r=4, alpha=8), Rule(role="mlp", r=2, alpha=4)]
    traced = trace(model, args, frontend="fx").graph_module
    adapted = lora_fx.adapt(model, rules, example_inputs=args, frontend="fx")
    with torch.no_grad():
        for lora in adapted.lora_fx.values():  # as if trained: B != 0, so fold changes the weights
            lora.lora_B.normal_(0, 0.1)
    folded = lora_fx.fold(adapted)
    return traced, adapted, folded, rules


# ------------------------------------------------------------------------------------------------ FX graph -> picture
def _describe(gm, node) -> tuple[str, str]:
    """(label, kind) of an FX node."""
    if node.op == "placeholder":
        return (f"{node.name} (input)", "io")
    if node.op == "output":
        return ("output", "io")
    tag = node.meta.get("lora_fx")
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        cls = type(module).__name__
        if tag and tag[0] == "branch":
            return (f"{node.target}\nLoRA r={module.r}, α/r={module.scaling:g}", "lora")
        if cls == "Linear":
            return (f"{node.name}\nLinear {module.in_features}→{module.out_features}", "site")
        return (f"{node.name}\n{cls}", "op")
    name = getattr(node.target, "__name__", str(node.target))
    if tag and tag[0] == "add":
        return (f"{node.name}\nadd (base + LoRA)", "lora_add")
    return (node.name if name == node.name else f"{node.name}\n{name}", "op")


def to_networkx(gm):
    import networkx as nx

    g = nx.DiGraph()
    for node in gm.graph.nodes:
        label, kind = _describe(gm, node)
        g.add_node(node.name, label=label, kind=kind)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def layered_layout(g, x_gap: float = 2.2, y_gap: float = 1.0) -> dict[str, tuple[float, float]]:
    """Top-down layers from the topological generations; within a layer, nodes keep graph order."""
    import networkx as nx

    order = {n: i for i, n in enumerate(g.nodes)}
    pos = {}
    for depth, layer in enumerate(nx.topological_generations(g)):
        layer = sorted(layer, key=order.__getitem__)
        for i, n in enumerate(layer):
            pos[n] = ((i - (len(layer) - 1) / 2) * x_gap, -depth * y_gap)
    return pos


def _data_box(ax, text) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a text box in data coordinates."""
    inverse = ax.transData.inverted()
    extent = text.get_bbox_patch().get_window_extent()
    (x0, y0), (x1, y1) = inverse.transform((extent.x0, extent.y0)), inverse.transform((extent.x1, extent.y1))
    return x0, y0, x1, y1


def _route(u, v, pos, extents, ax, fig) -> str:
    """A straight arrow when nothing stands between the two nodes; else (a residual connection skipping layers) an
    elbow around the boxes in between, on the side where it is shorter."""
    (xa, ya), (xb, yb) = pos[u], pos[v]
    between = [extents[n] for n in pos if n not in (u, v) and min(ya, yb) < pos[n][1] < max(ya, yb)]
    pad = 0.08

    def blocked(t: float) -> bool:
        x, y = xa + t * (xb - xa), ya + t * (yb - ya)
        return any(x0 - pad <= x <= x1 + pad and y0 - pad <= y <= y1 + pad for x0, y0, x1, y1 in between)

    if not any(blocked(i / 60) for i in range(1, 60)):
        return "arc3,rad=0"
    right = max([x1 for _, _, x1, _ in between] + [max(xa, xb)]) + 0.35
    left = min([x0 for x0, _, _, _ in between] + [min(xa, xb)]) - 0.35
    go_right = right - max(xa, xb) <= min(xa, xb) - left
    target = right if go_right else left
    # FancyArrowPatch takes the arms in display pixels: the figure is drawn and saved at one dpi (DPI)
    pixels = lambda dx: abs(ax.transData.transform((dx, 0))[0] - ax.transData.transform((0, 0))[0])
    angle = 0 if go_right else 180
    return f"arc,angleA={angle},angleB={angle},armA={pixels(target - xa):.1f},armB={pixels(target - xb):.1f},rad=6"


def draw_graph(g, pos, path: pathlib.Path, title: str, legend: list[str], frame=None) -> None:
    """Draw `g` at `pos`. frame: (xs, ys) of the positions that fix the axes (to draw several graphs alike)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Patch

    xs, ys = frame or ([p[0] for p in pos.values()], [p[1] for p in pos.values()])
    width, height = max(xs) - min(xs) + 2.6, max(ys) - min(ys) + 1.6
    fig, ax = plt.subplots(figsize=(max(6.5, 1.25 * width), 0.62 * height + 1.2), dpi=DPI)
    ax.set_xlim(min(xs) - 1.3, max(xs) + 1.3)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.6)
    ax.axis("off")
    boxes = {}
    for n, data in g.nodes(data=True):
        boxes[n] = ax.text(*pos[n], data["label"], ha="center", va="center", fontsize=8.5, zorder=3,
                           family="DejaVu Sans", linespacing=1.25,
                           bbox=dict(boxstyle="round,pad=0.35", fc=COLOURS[data["kind"]], ec="#444444", lw=0.8))
    handles = [Patch(fc=COLOURS[k], ec="#444444", label=text) for k, text in
               (("site", "linear site (W0)"), ("lora", "LoRA branch (trains A, B)"), ("lora_add", "add: base + LoRA"),
                ("folded", "site with folded weight W0 + (α/r)·B·A"), ("io", "input / output")) if k in legend]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(handles)),
              fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10.5)
    fig.tight_layout()  # before measuring: it moves the axes, and the elbows' arms are in pixels
    fig.canvas.draw()  # box sizes are known after a draw
    extents = {n: _data_box(ax, box) for n, box in boxes.items()}
    for u, v in g.edges:
        style = _route(u, v, pos, extents, ax, fig)
        ax.add_patch(FancyArrowPatch(pos[u], pos[v], patchA=boxes[u].get_bbox_patch(),
                                     patchB=boxes[v].get_bbox_patch(), arrowstyle="-|>", mutation_scale=10,
                                     color="#555555" if style == "arc3,rad=0" else "#888888", lw=0.9, zorder=2,
                                     connectionstyle=style, shrinkA=2, shrinkB=2))
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def render_fx(out: pathlib.Path) -> list[pathlib.Path]:
    traced, adapted, folded, rules = graphs()
    g_traced, g_adapted, g_folded = to_networkx(traced), to_networkx(adapted), to_networkx(folded)
    pos = layered_layout(g_adapted)
    # the traced and folded graphs are drawn in the adapted graph's layout: same place for the same node
    folded_weights = {lora.weight_name.rsplit(".", 1)[0] for lora in adapted.lora_fx.values()}
    for n, data in g_folded.nodes(data=True):
        if n in folded_weights:
            data["kind"] = "folded"
            data["label"] += "\nW0 + (α/r)·B·A"
    rules_text = ", ".join(r.describe() for r in rules)
    n_sites = sum(1 for _, data in g_traced.nodes(data=True) if data["kind"] == "site")
    files = []
    for name, g, title, legend in (
            ("fx_traced.png", g_traced, f"1. traced (torch.fx): {n_sites} linear sites", ["site", "io"]),
            ("fx_injected.png", g_adapted, f"2. after inject: {len(adapted.lora_fx)} LoRA branches\n{rules_text}",
             ["site", "lora", "lora_add", "io"]),
            ("fx_folded.png", g_folded, f"3. after fold: the traced graph again, {len(folded_weights)} weights changed",
             ["site", "folded", "io"])):
        path = out / name
        frame = ([p[0] for p in pos.values()], [p[1] for p in pos.values()])
        draw_graph(g, {n: pos[n] for n in g.nodes}, path, title, legend, frame)
        files.append(path)
    return files


# ------------------------------------------------------------------------------------------------ the pipeline
PIPELINE_NODES = {  # name: (x, y, label, kind)
    "model": (0.0, 2.0, "nn.Module\n(your model)", "io"),
    "gm": (2.6, 2.0, "GraphModule", "op"),
    "sites": (5.2, 2.0, "[Site]\nop, weight, shape,\nlayer, roles", "op"),
    "decisions": (7.8, 2.0, "[Decision]\nrule, r, alpha", "op"),
    "adapted": (10.4, 2.0, "adapted\nGraphModule", "lora"),
    "merged": (10.4, 0.0, "merged\nGraphModule\n(= traced graph)", "folded"),
    "merged_onnx": (7.8, -2.0, "merged.onnx", "folded"),
    "base_onnx": (0.0, -2.0, "base.onnx", "io"),
    "report": (3.9, -2.0, "VerifyReport\nIDENTICAL", "site"),
}
PIPELINE_EDGES = [  # (from, to, label)
    ("model", "gm", "trace\npasses/trace.py"),
    ("gm", "sites", "match\npasses/match.py\n+ roles"),
    ("sites", "decisions", "rules\nlora_fx/rules.py"),
    ("decisions", "adapted", "inject\npasses/inject.py"),
    ("adapted", "merged", "fold\npasses/fold.py"),
    ("merged", "merged_onnx", "export_onnx"),
    ("model", "base_onnx", "export_onnx"),
    ("base_onnx", "report", "verify_onnx"),
    ("merged_onnx", "report", "verify_onnx"),
]


def render_pipeline(out: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt
    import networkx as nx
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    g = nx.DiGraph()
    for name, (x, y, label, kind) in PIPELINE_NODES.items():
        g.add_node(name, pos=(x, y), label=label, kind=kind)
    for u, v, label in PIPELINE_EDGES:
        g.add_edge(u, v, label=label)
    assert nx.is_directed_acyclic_graph(g)

    fig, ax = plt.subplots(figsize=(11, 5.4), dpi=DPI)
    ax.set_xlim(-1.2, 11.7)
    ax.set_ylim(-2.9, 3.0)
    ax.axis("off")
    boxes = {}
    for n, data in g.nodes(data=True):
        boxes[n] = ax.text(*data["pos"], data["label"], ha="center", va="center", fontsize=9.5, zorder=3,
                           bbox=dict(boxstyle="round,pad=0.45", fc=COLOURS[data["kind"]], ec="#333333", lw=1.0))
    fig.canvas.draw()
    for u, v, data in g.edges(data=True):
        (x0, y0), (x1, y1) = g.nodes[u]["pos"], g.nodes[v]["pos"]
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), patchA=boxes[u].get_bbox_patch(),
                                     patchB=boxes[v].get_bbox_patch(), arrowstyle="-|>", mutation_scale=14,
                                     color="#333333", lw=1.2, zorder=2, shrinkA=3, shrinkB=3))
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        horizontal = abs(y1 - y0) < 1e-6
        ax.text(mx + (0 if horizontal else 0.15), my + (0.55 if horizontal else 0), data["label"],
                ha="center" if horizontal else "left", va="center", fontsize=8, color="#08519c", zorder=4)
    # training happens on the adapted module: a note beside it
    ax.add_patch(FancyBboxPatch((10.95, 1.45), 0.55, 1.1, boxstyle="round,pad=0.05", fc="none", ec="#d94801",
                                lw=1.0, ls="--"))
    ax.text(11.22, 2.0, "train\nA, B", ha="center", va="center", fontsize=8, color="#d94801")
    ax.set_title("lora_fx: a pipeline of passes over a torch.fx GraphModule", fontsize=11)
    fig.tight_layout()
    path = out / "pipeline.png"
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    _require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in [render_pipeline(out), *render_fx(out)]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
