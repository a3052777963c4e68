"""Side screen, not the library: forget_eval.py with two more variants whose private inputs inside each block are
re-collected after each input group is fitted (o_proj's X_b read through the base's q/k/v, gate/up's through the base's
attention, down_proj's through the base's gate/up), for H_priv and C alike; H_pub stays as decompose collects it.
decompose._fit_block is wrapped, and switched on per variant by a '_sequential' key taken out in a wrapped preset().

Why: decompose collects X_b of a block's later layers through the fine-tuned layers before them, while at alpha 0 the
base's earlier layers of the block already act like P on the forget texts; with forget_target='public_activations'
the fit then maps the fine-tune's intermediate inputs onto P's outputs and overshoots (docs/forget_target/).

    python experiments/forget_target_sequential.py --preset default --seeds 0 --threads 1 --alphas 0 \
        --only "records, sequential X_b" "records, P activations, sequential X_b" --out OUT.json
"""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "experiments"), str(ROOT)]
import forget_eval as fe  # noqa: E402
from libortho.curvatures import BlockCurvatures  # noqa: E402

D = importlib.import_module("libortho.decompose")
orig_fit_block = D._fit_block
SEQ = {"on": False}


def seq_fit_block(b, plan, config, needs_h, public, private, parts, stats, finish, p_acts=None):
    if not SEQ["on"] or private is None:
        return orig_fit_block(b, plan, config, needs_h, public, private, parts, stats, finish, p_acts)
    if plan.block_loader is not None:
        plan.block_loader.load(b)
    block, targets = plan.blocks[b], plan.targets[b]
    curv = BlockCurvatures(D._block_hessians(block, targets, public), {}, config, {} if p_acts is not None else None)
    P_in = list(p_acts.inputs.hidden) if p_acts is not None else None
    remaining, on_host = list(targets), {}
    while remaining:
        sub = {n: block.get_submodule(n) for n in remaining}  # fitted layers are base-only already
        H_priv = D._block_hessians(block, sub, private)
        group = [n for n in remaining if H_priv[n] is H_priv[remaining[0]]]
        curv.priv.update({n: H_priv[n] for n in group})
        if p_acts is not None:
            p_acts.inputs.hidden = P_in  # P's block b input again; the last call leaves P's block b output
            C = p_acts.cross_moments(b, block, sub, private)
            curv.cross.update({n: C[n] for n in group})
        del H_priv
        for name in group:
            parts[(b, name)] = D._fit_layer((b, name), targets[name], curv, plan, config, stats, finish, on_host)
            targets[name] = block.get_submodule(name)
        remaining = [n for n in remaining if n not in group]


D._fit_block = seq_fit_block
orig_preset = fe.preset


def preset(name, **overrides):
    SEQ["on"] = bool(overrides.pop("_sequential", False))
    return orig_preset(name, **overrides)


fe.preset = preset
fe.VARIANTS["records, sequential X_b"] = (dict(forget_source="records", _sequential=True), "members")
fe.VARIANTS["records, P activations, sequential X_b"] = (
    dict(forget_source="records", forget_target="public_activations", _sequential=True), "members")

if __name__ == "__main__":
    fe.main()
