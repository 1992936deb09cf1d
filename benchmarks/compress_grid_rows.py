"""Rows of the compression grid of issue #12 (SmolLM2-135M, all 210 projections), for
``bench_compress_grid.py``.

Each row is a dict: ``name`` (also the result file's stem), ``kind`` ("ours" or "peer"),
``label`` (method / settings for the table), ``windows`` (calibration windows; ``None``: the
run's ``--windows``), and either ``recipe`` (ours: a list of step dicts for ``load_recipe``,
``None`` for dense) or ``scheme`` (the peer: ``llmcompressor_run.py --scheme``). ``peer`` names
the llm-compressor row an own row is compared with (ratio columns), ``ours`` the reverse.

Order: dense (the reference), then every own row that shares a setting with a peer row followed
by that peer row, then the rest. llm-compressor's GPTQModifier sorts columns by activation order
("static") by default, so the act-order rows (``-act``) are the ones compared with the peer rows.

All quantisation is symmetric (``sym: true``), as the peer's ``--scheme`` is. :func:`orderings`
checks the literature's orderings among the rows present (PTB perplexity).
"""
from __future__ import annotations

MODEL = "smollm2-135m"
TARGETS = "all-linear"
QUANT = {"w4-channel": {"bits": 4, "group_size": None}, "w3-g64": {"bits": 3, "group_size": 64},
         "w2-g32": {"bits": 2, "group_size": 32}}
PRUNE = {"50": {"sparsity": 0.5, "pattern": "unstructured"}, "2:4": {"pattern": "2:4"}}
EORA_RANKS = (16, 32, 64)
APPROX, MUCH = 1.15, 1.5  # orderings: "≈" within 15 %; "≪" at least 1.5 times


def step(method: str, **params) -> dict:
    return {"method": method, "targets": TARGETS, **params}


def quant(method: str, setting: str, act_order: bool = False) -> dict:
    extra = {"act_order": True} if act_order else {}
    return step(method, **QUANT[setting], sym=True, **extra)


def prune(method: str, setting: str) -> dict:
    return step(method, **PRUNE[setting])


def describe(recipe: list[dict] | None) -> str:
    """``gptq 3b g64 act → eora r32``: the table's method / settings of a recipe."""
    if not recipe:
        return "dense (fp32)"
    parts = []
    for s in recipe:
        p = {k: v for k, v in s.items() if k not in ("method", "targets")}
        words = [s["method"]]
        if "bits" in p:
            words += [f"{p.pop('bits')}b", "ch" if p.pop("group_size") is None else
                      f"g{s['group_size']}"]
            words += [] if p.pop("sym", True) else ["asym"]
            words += ["act"] if p.pop("act_order", False) else []
        if "pattern" in p:
            pattern = p.pop("pattern")
            words.append(f"{p.pop('sparsity'):.0%}" if pattern == "unstructured" else pattern)
        if "fraction" in p:
            words += [f"{p.pop('fraction'):.1%}", f"by {p.pop('by', 'magnitude')}"]
        if "rank" in p:
            words.append(f"r{p.pop('rank')}")
        words += [f"{k}={v}" for k, v in p.items()]
        parts.append(" ".join(words))
    return " → ".join(parts)


def ours(name: str, recipe: list[dict] | None, windows: int | None = None,
         peer: str | None = None) -> dict:
    return {"name": name, "kind": "ours", "recipe": recipe, "label": describe(recipe),
            "windows": windows, "peer": peer}


def theirs(scheme: str, ours_name: str, windows: int | None = None) -> dict:
    suffix = "" if windows is None else f"-n{windows}"
    return {"name": f"peer-{scheme}{suffix}", "kind": "peer", "scheme": scheme,
            "label": f"llm-compressor {scheme}", "windows": windows, "ours": ours_name}


def grid() -> list[dict]:
    rows = [ours("dense", None)]
    # llm-compressor's GPTQ sweeps columns in activation order ("static") by default: its
    # counterpart is our act_order row
    shared = [("gptq-w4-channel-act", "gptq-w4-channel", [quant("gptq", "w4-channel", True)], None),
              ("gptq-w3-g64-act", "gptq-w3-g64", [quant("gptq", "w3-g64", True)], None),
              ("sparsegpt-50", "sparsegpt-50", [prune("sparsegpt", "50")], None),
              ("wanda-50", "wanda-50", [prune("wanda", "50")], None),
              ("gptq-w4-channel-act-n32", "gptq-w4-channel", [quant("gptq", "w4-channel", True)],
               32)]
    for name, scheme, recipe, windows in shared:
        peer = theirs(scheme, name, windows)
        rows += [ours(name, recipe, windows, peer["name"]), peer]
    rows += [ours(f"rtn-{s}", [quant("rtn", s)]) for s in QUANT]
    rows += [ours(f"gptq-{s}", [quant("gptq", s)]) for s in QUANT]
    rows.append(ours("gptq-w2-g32-act", [quant("gptq", "w2-g32", True)]))
    rows += [ours(f"{m}-{s}", [prune(m, s)]) for s in PRUNE for m in
             ("magnitude", "wanda", "sparsegpt") if f"{m}-{s}" not in {"wanda-50", "sparsegpt-50"}]
    rows += [ours(f"gptq-w3-g64-eora-r{r}", [quant("gptq", "w3-g64"), step("eora", rank=r)])
             for r in EORA_RANKS]
    rows.append(ours("lowrank-r32-gptq-w3-g64",
                     [step("lowrank_first", rank=32), quant("gptq", "w3-g64")]))
    rows.append(ours("outliers-0.005-gptq-w3-g64",
                     [step("outliers", fraction=0.005, by="hessian"), quant("gptq", "w3-g64")]))
    rows.append(ours("sparsegpt-2:4-gptq-w4-channel-eora-r32",
                     [prune("sparsegpt", "2:4"), quant("gptq", "w4-channel"),
                      step("eora", rank=32)]))
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)), names
    return rows


def orderings(results: dict[str, dict]) -> list[str]:
    """The literature's orderings among the rows in ``results`` (row name -> result), one line
    each with the numbers and whether it holds; an ordering with a row missing is left out."""
    def ppl(name):
        return results[name]["ppl_ptb"] if name in results else None

    lines = []
    for s in ("w3-g64", "w4-channel", "w2-g32"):
        g, r = ppl(f"gptq-{s}"), ppl(f"rtn-{s}")
        if g is not None and r is not None:
            lines.append(f"gptq < rtn at {s}: {g:.2f} < {r:.2f}: {g < r}")
    for s in ("50", "2:4"):
        sg, wa, mag = ppl(f"sparsegpt-{s}"), ppl(f"wanda-{s}"), ppl(f"magnitude-{s}")
        if sg is not None and wa is not None:
            lines.append(f"sparsegpt ≈ wanda at {s} (within {APPROX - 1:.0%}): {sg:.2f} vs "
                         f"{wa:.2f}: {max(sg, wa) / min(sg, wa) <= APPROX}")
        best = {m: v for m, v in (("sparsegpt", sg), ("wanda", wa)) if v is not None}
        if best and mag is not None:
            lines.append(f"{' and '.join(best)} ≪ magnitude at {s} (magnitude ≥ {MUCH}× the "
                         f"worse): {' / '.join(f'{v:.2f}' for v in best.values())} vs "
                         f"{mag:.2f}: {mag >= MUCH * max(best.values())}")
    chain = [(r, ppl(f"gptq-w3-g64-eora-r{r}")) for r in (16, 32, 64)]
    chain = [(r, v) for r, v in chain if v is not None]
    if len(chain) >= 2:
        ok = all(a[1] > b[1] for a, b in zip(chain, chain[1:]))
        lines.append("eora ppl falls with rank " + " > ".join(f"r{r} {v:.2f}" for r, v in chain)
                     + f": {ok}")
    base = ppl("gptq-w3-g64")
    if chain and base is not None:
        lines.append(f"eora r{chain[0][0]} < its gptq-w3-g64 base: {chain[0][1]:.2f} < "
                     f"{base:.2f}: {chain[0][1] < base}")
    return lines


def file_stem(name: str) -> str:
    return name.replace(":", "_")
