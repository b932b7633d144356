"""A summary HTML page over a results store (:class:`~knlens.store.Store`), offline: every figure an inline
PNG, no remote source.

What it shows, every number from a :meth:`~knlens.store.Store.sql` query over the store (or, for the
interventions, from the stored results loaded back):

- the tasks by study and status, and each failed task with the first line of its error;
- the setting groups: one per (study, model, settings, knlens version), named by a hash of the three.
  Results of different groups are never mixed: every table and figure below is per group;
- for ``locate``: per relation the facts, the share with a non-empty refined set, the layer histogram of
  the refined knowledge neurons, and the suppress / enhance effects of the tested neurons against the
  random controls (mean relative change of P(target));
- for ``trace``: the mean indirect effect at the last subject token per layer and kind (MLP, attention, ...)
  per relation, and its peak layer.

>>> import tempfile
>>> from knlens.store import Store
>>> from knlens.viz.html import remote_sources
>>> with tempfile.TemporaryDirectory() as d:
...     page = render_store(Store(d))
>>> "holds no tasks" in page and remote_sources(page) == []
True
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from knlens.core.errors import KnlensError, OutputError
from knlens.core.versions import __version__
from knlens.store.store import Store
from knlens.viz.html import PAGE_CSS, html_table, png_data

__all__ = ["render_store", "write_store_page", "GROUP_SQL"]

GROUP_SQL = "settings_hash"
"""The SQL expression naming a task's setting group: the store row's ``settings_hash``, a hash of its model,
settings and knlens version (:meth:`knlens.store.task.Task.group`)."""

_REL = "coalesce(relation, '(none)')"
_TRACE_GROUP = "last subject"


def _h(text: object) -> str:
    return html.escape(str(text))


def _first_line(text: object, limit: int = 300) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else "(no error recorded)"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _views(store: Store) -> set[str]:
    return set(store.sql("select table_name from information_schema.tables").table_name)


def _done(study: str) -> str:
    """The done tasks of ``study`` with their relation and setting group (an SQL subquery)."""
    return (f"(select key, {_REL} as relation, {GROUP_SQL} as grp from tasks "
            f"where study = '{study}' and status = 'done')")


# ------------------------------------------------------------------------------------ sections

def _tasks_section(store: Store) -> str:
    counts = store.sql("select study, count(*) filter (where status = 'done') as done, "
                       "count(*) filter (where status = 'failed') as failed, count(*) as tasks, "
                       "(select count(*) from attempts a where a.study = t.study) as attempts, "
                       "sum(seconds) filter (where status = 'done') as seconds_done "
                       "from tasks t group by study order by study")
    out = ["<h2>Tasks</h2>", html_table(counts, left=("study",)),
           '<p class="note">A task is one (study, fact, model, settings); its status is that of its stored result, '
           "or of its latest attempt when every attempt failed.</p>"]
    failed = store.sql("select key, model, knlens_version, error, finished from tasks where status = 'failed' "
                       "order by key")
    if len(failed):
        failed = failed.assign(error=failed.error.map(_first_line))
        out += [f"<h3>Failed tasks ({len(failed)})</h3>",
                '<p class="note">Run them again with <code>knlens sweep ... --retry-failed</code>; the traceback is '
                "in the store (<code>select traceback from tasks where status = 'failed'</code>).</p>",
                html_table(failed, left=("key", "model", "knlens_version", "error", "finished"),
                       formats={"finished": lambda x: _h(str(x)[:19])})]
    return "\n".join(out)


def _groups_section(store: Store) -> str:
    groups = store.sql(f"select {GROUP_SQL} as grp, study, model, knlens_version, settings, "
                       "count(*) as tasks, count(*) filter (where status = 'done') as done "
                       "from tasks group by all order by study, grp")
    versions = store.sql("select knlens_version, count(*) as tasks from tasks group by all order by 1")
    vtext = ", ".join(f"knlens {_h(v)} ({n} tasks)" for v, n in zip(versions.knlens_version, versions.tasks))
    return "\n".join([
        "<h2>Setting groups</h2>",
        f"<p>Versions present: {vtext}. A group is one study, model, settings and knlens version; results of "
        "different groups are never mixed below. Its name is the store's <code>settings_hash</code>, a hash of "
        "the three.</p>",
        html_table(groups, left=("grp", "study", "model", "knlens_version", "settings"))])


def _histogram(hist: pd.DataFrame, n_layers: int, title: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    relations = sorted(hist.relation.unique())
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n_layers + 2), 2.8))
    width = 0.8 / max(1, len(relations))
    for i, rel in enumerate(relations):
        h = hist[hist.relation == rel].set_index("layer").n.reindex(range(n_layers), fill_value=0)
        ax.bar(np.arange(n_layers) + (i - (len(relations) - 1) / 2) * width, h.to_numpy(), width=width, label=rel)
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("refined neurons")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, title="relation", title_fontsize=8)
    return f'<img alt="{_h(title)}" src="{png_data(fig)}">'


def _effects(store: Store, keys: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per (relation, action): the mean relative change of P(target) for the tested neurons and for each
    random control, over the facts of one group, from the stored results; and the keys that did not load."""
    rows, bad = [], []
    for key, relation in zip(keys.key, keys.relation):
        try:
            eff = store.load(key).effects()
        except (KnlensError, OSError, ValueError, KeyError, AttributeError) as err:
            bad.append(f"{key}: {_first_line(f'{type(err).__name__}: {err}', 200)}")
            continue
        label = np.where(eff["neurons"] == "knowledge", "knowledge", "random " + eff["control"].astype(str))
        for action, set_name, rel in zip(eff["action"], label, eff["relative"]):
            rows.append({"relation": relation, "key": key, "action": action, "set": set_name, "relative": rel})
    if not rows:
        return pd.DataFrame(), bad
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index=["relation", "action"], columns="set", values="relative", aggfunc="mean")
    facts = frame.groupby(["relation", "action"]).key.nunique().rename("facts")
    table = pd.concat([facts, table], axis=1).reset_index()
    ctrl = [c for c in table.columns if str(c).startswith("random ")]
    if "knowledge" in table and ctrl:
        sign = np.where(table.action == "suppress", -1.0, 1.0)
        beats = np.all([sign * (table["knowledge"] - table[c]) > 0 for c in ctrl], axis=0)
        table["beats controls"] = beats
    table.columns = [str(c) for c in table.columns]
    return table, bad


def _locate_section(store: Store, views: set[str]) -> str:
    done = _done("locate")
    per_rel = store.sql(
        f"with r as (select key, bool_or(refined) as any_refined, count(*) filter (where refined) as n_refined "
        f"from locate_rows group by key) "
        f"select grp, relation, count(*) as facts, count(*) filter (where r.any_refined) as with_refined, "
        f"avg(coalesce(r.n_refined, 0)) as mean_refined from {done} t left join r using (key) "
        f"group by all order by grp, relation") if "locate_rows" in views else pd.DataFrame()
    if per_rel.empty:
        return ""
    per_rel["share_refined"] = per_rel.with_refined / per_rel.facts
    hist = store.sql(f"select grp, relation, layer, count(*) as n from locate_rows join {done} t using (key) "
                     f"where refined group by all order by grp, relation, layer")
    layers = store.sql(f"select grp, max(layer) + 1 as n_layers from locate_rows join {done} t using (key) "
                       f"group by grp")
    n_layers = dict(zip(layers.grp, layers.n_layers))
    keys = store.sql(f"select key, relation, grp from {done} t order by grp, relation, key")
    out = ["<h2>Knowledge neurons (locate)</h2>",
           '<p class="note">Per relation: the facts, how many have a non-empty refined set (neurons kept across '
           "the fact's prompts), the mean number of refined neurons, their layers, and the in-sample "
           "interventions: the mean relative change of P(target) when the tested neurons are suppressed (×0) "
           "or enhanced (×2), against random neuron sets of the same size (uniform, and magnitude-matched). "
           "<em>beats controls</em>: the tested neurons move P(target) further, in the action's direction, "
           "than every control, on average.</p>"]
    for grp, rows in per_rel.groupby("grp", sort=True):
        out.append(f"<h3>Group <code>{_h(grp)}</code></h3>")
        out.append(html_table(rows.drop(columns="grp")[["relation", "facts", "with_refined", "share_refined",
                                                     "mean_refined"]], left=("relation",),
                          formats={"share_refined": lambda x: "–" if not math.isfinite(x) else f"{100 * x:.0f} %"}))
        h = hist[hist.grp == grp]
        if h.empty:
            out.append("<p>No refined neurons in this group.</p>")
        else:
            out.append(_histogram(h, int(n_layers[grp]), f"refined neurons per layer, group {grp}"))
        effects, bad = _effects(store, keys[keys.grp == grp])
        if not effects.empty:
            out.append(html_table(effects, left=("relation", "action"),
                              formats={"beats controls": lambda x: "yes" if x else "no"}))
        if bad:
            out.append('<p class="warn">Results that did not load: ' + "; ".join(map(_h, bad)) + "</p>")
    return "\n".join(out)


def _trace_figure(frame: pd.DataFrame, title: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kinds = sorted(frame.kind.unique())
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 2.9), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        for rel, g in frame[frame.kind == kind].groupby("relation", sort=True):
            ax.plot(g.layer, g.mean_ie, marker="o", markersize=3, label=rel)
        ax.axhline(0, color="#999", linewidth=0.6)
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("mean indirect effect")
    axes[0][-1].legend(fontsize=8, title="relation", title_fontsize=8)
    fig.suptitle(title, fontsize=10, y=1.03)
    return f'<img alt="{_h(title)}" src="{png_data(fig)}">'


def _trace_section(store: Store, views: set[str]) -> str:
    if "trace_rows" not in views:
        return ""
    done = _done("trace")
    ie = store.sql(f"select grp, relation, kind, layer, avg(indirect_effect) as mean_ie, "
                   f"count(distinct key) as facts from trace_rows join {done} t using (key) "
                   f"where \"group\" = '{_TRACE_GROUP}' group by all order by grp, relation, kind, layer")
    if ie.empty:
        return ""
    out = ["<h2>Causal tracing (trace)</h2>",
           f'<p class="note">Mean indirect effect (P restored − P corrupted) of restoring one layer\'s output at '
           f"the {_TRACE_GROUP} token, per kind and relation, over the facts of each group; the peak is the layer "
           "where that mean is largest.</p>"]
    for grp, rows in ie.groupby("grp", sort=True):
        peaks = rows.loc[rows.groupby(["relation", "kind"]).mean_ie.idxmax()]
        peaks = peaks[["relation", "kind", "facts", "layer", "mean_ie"]].rename(
            columns={"layer": "peak_layer", "mean_ie": "peak_mean_ie"})
        out += [f"<h3>Group <code>{_h(grp)}</code></h3>", html_table(peaks, left=("relation", "kind")),
                _trace_figure(rows, f"mean indirect effect at the {_TRACE_GROUP} token, group {grp}")]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ the page

def render_store(store: Store) -> str:
    """The summary page of ``store`` as one self-contained HTML string (see the module's docstring)."""
    n = int(store.sql("select count(*) as n from tasks").n[0])
    head = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>knlens store {_h(store.path)}</title>"
            f"<style>{PAGE_CSS}</style></head><body>\n<h1>Results store <code>{_h(store.path)}</code></h1>\n"
            f'<p class="sub">summary written by knlens {_h(__version__)}</p>')
    parts = [head]
    problems = store.problems()
    if problems:
        parts.append('<p class="warn">Files ignored: ' + "; ".join(map(_h, problems)) + "</p>")
    if n == 0:
        parts.append("<p>This store holds no tasks yet: run <code>knlens sweep</code> into it.</p>")
    else:
        views = _views(store)
        parts += [_tasks_section(store), _groups_section(store), _locate_section(store, views),
                  _trace_section(store, views)]
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)


def write_store_page(store: Store | str | Path, path: str | Path) -> Path:
    """Write :func:`render_store` of ``store`` (a :class:`~knlens.store.Store` or its folder, which must be a
    store) to ``path``; the path. A file that cannot be written is an :class:`~knlens.core.errors.OutputError`."""
    store = store if isinstance(store, Store) else Store(store, create=False)
    page = render_store(store)
    path = Path(path)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as err:
        raise OutputError(f"cannot write the summary page {str(path)!r}: {err.strerror or err}") from err
    return path

