"""The review app: browse clusters, fix their labels, export them.

Run it with `selflabel app RUN` or `streamlit run app/review_app.py -- RUN` (or set SELFLABEL_RUN).
Every edit goes straight into RUN/review.sqlite (see `store.py`); the page only draws that state.
Images are read only through `thumbs.safe_path`, inside the run's image root.
"""
from __future__ import annotations

import hmac
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, Callable

import altair as alt
import matplotlib

matplotlib.use("Agg")  # the server draws figures off-screen
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from selflabel.curate.duplicates import DUPLICATE_COLUMN  # noqa: E402
from selflabel.curate.prepare import centred_unit  # noqa: E402
from selflabel.curate.run import NEIGHBOURS, load_neighbours, neighbours_of  # noqa: E402
from selflabel.curate.suggestions import Suggestion, suggest  # noqa: E402
from selflabel.dense.graph import load_graph  # noqa: E402
from selflabel.errors import SelflabelError  # noqa: E402
from selflabel.naming import concept_name  # noqa: E402
from selflabel.export import export_run, formats_for  # noqa: E402
from selflabel.review.launch import TOKEN_ENV, TOKEN_PARAM  # noqa: E402
from selflabel.review.store import SPLIT_METHODS, ReviewStore  # noqa: E402
from selflabel.review.thumbs import ThumbCache, safe_path  # noqa: E402
from selflabel.runfiles import DENSE, EXPORTS, FEATURES, read_manifest  # noqa: E402
from selflabel.suggest import suggested_names  # noqa: E402

try:  # optional: UMAP projections in the Map view
    import umap  # noqa: E402
except ImportError:
    umap = None

VIEWS = ("Overview", "Suggestions", "Cluster", "Duplicates", "Map", "Dense", "Export")
SUGGESTIONS_SHOWN = 10
GROUPS_PER_PAGE = 10
CARDS_PER_PAGE = 12
GRID_COLS = 8
NEW_CLUSTER = -1  # move target meaning "a fresh cluster"
MAP_POINTS = 20_000


# ------------------------------------------------------------------------- resources
def run_dir_from_env() -> Path | None:
    """The run folder: $SELFLABEL_RUN, else the first argument after `--` of `streamlit run`."""
    if os.environ.get("SELFLABEL_RUN"):
        return Path(os.environ["SELFLABEL_RUN"])
    if Path(sys.argv[0]).name in {"review_app.py", "app_main.py"} and len(sys.argv) > 1:
        return Path(sys.argv[1])
    return None


@st.cache_resource(show_spinner=False)
def get_store(run_dir: str) -> ReviewStore:
    return ReviewStore(run_dir)


@st.cache_data(show_spinner="Projecting features ...", max_entries=4)
def embedding_2d(features_path: str, mtime_ns: int, method: str) -> np.ndarray:
    """2-D map of the (L2-normalised) features: PCA, or UMAP when installed and asked for."""
    x = np.load(features_path, mmap_mode="r", allow_pickle=False).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "UMAP":
        return umap.UMAP(n_components=2, random_state=0).fit_transform(x).astype(np.float32)
    return PCA(n_components=2, random_state=0).fit_transform(x).astype(np.float32)


def authorised() -> bool:
    """True when the server asks for no token ($SELFLABEL_TOKEN unset), or this session showed it
    (`?token=` in the address, once per session)."""
    want = os.environ.get(TOKEN_ENV)
    if not want or st.session_state.get("_authorised"):
        return True
    given = st.query_params.get(TOKEN_PARAM, "")
    if hmac.compare_digest(given.encode("utf-8", "replace"), want.encode("utf-8")):
        st.session_state["_authorised"] = True
        return True
    return False


def act(fn: Callable[..., Any], *args: Any, done: str = "", clear: bool = False, **kwargs: Any) -> None:
    """Button callback: run one store edit, keep its message (or its error) for the next draw."""
    try:
        result = fn(*args, **kwargs)
    except SelflabelError as exc:
        st.session_state["flash"] = ("error", str(exc))
        return
    except sqlite3.OperationalError as exc:  # e.g. locked for longer than busy_timeout by another writer
        st.session_state["flash"] = ("error", f"The review database is busy ({exc}); nothing was changed, try again.")
        return
    if result is None or result == []:
        st.session_state["flash"] = ("info", "Nothing changed.")
    else:
        st.session_state["flash"] = ("success", done or "Saved.")
    if clear:
        clear_selection()


def selected_paths() -> list[str]:
    return [k[len("sel|"):] for k, v in st.session_state.items() if isinstance(k, str) and k.startswith("sel|") and v]


def clear_selection() -> None:
    for k in [k for k in st.session_state.keys() if isinstance(k, str) and k.startswith("sel|")]:
        del st.session_state[k]


# ------------------------------------------------------------------------- views
def sidebar(store: ReviewStore, run: Path, manifest: dict) -> tuple[str, list]:
    """The sidebar; returns the chosen view and the clusters (read once per script run, shared by the views)."""
    st.sidebar.title("selflabel review")
    st.sidebar.caption(f"run `{run}`  \nimages `{manifest.get('data_root')}`")
    views = [v for v in VIEWS if v != "Dense" or (run / DENSE).is_dir()]
    if not (run / FEATURES).is_file():
        views = [v for v in views if v != "Suggestions"]
    if st.session_state.get("view") not in views:
        st.session_state["view"] = views[0]
    view = st.sidebar.radio("View", views, key="view")
    clusters = store.clusters()
    names = {c.id: c for c in clusters}
    if st.session_state.get("cluster") not in names and clusters:
        st.session_state["cluster"] = clusters[0].id
    st.sidebar.selectbox("Cluster", [c.id for c in clusters], key="cluster",
                         format_func=lambda c: f"{names[c].name} ({names[c].size})" if c in names else str(c))
    st.sidebar.divider()
    history = store.history(limit=20)
    last = next((e for e in history if e.active), None)
    st.sidebar.button("Undo last edit", key="undo", disabled=last is None, on_click=act,
                      args=(store.undo,), kwargs={"done": f"Undone: {last.summary}" if last else ""},
                      help=f"Undo: {last.summary}" if last else "Nothing to undo")
    with st.sidebar.expander(f"Edit history ({sum(e.kind != 'undo' for e in history)} shown)"):
        for e in history:
            st.markdown(f"{'~~' if not e.active else ''}#{e.id} {e.summary}{'~~' if not e.active else ''}")
    return view, clusters


def overview(store: ReviewStore, thumbs: ThumbCache, clusters: list) -> None:
    n_img = sum(c.size for c in clusters)
    st.header(f"{len(clusters)} clusters · {n_img} images")
    pages = max(1, -(-len(clusters) // CARDS_PER_PAGE))
    page = st.number_input("Page", 1, pages, 1, key="cards_page", help=f"{pages} page(s) of {CARDS_PER_PAGE} clusters") - 1
    shown = clusters[page * CARDS_PER_PAGE : (page + 1) * CARDS_PER_PAGE]
    cols = st.columns(3)
    for i, c in enumerate(shown):
        with cols[i % 3].container(border=True):
            st.markdown(f"**{c.name}** · {c.size} images · conf {c.mean_confidence:.2f}"
                        + (f" · {c.n_rejected} rejected" if c.n_rejected else "")
                        + (f" · {c.n_unsure} unsure" if c.n_unsure else ""))
            top = [m.path for m in store.members(c.id, limit=6)]
            imgs = [str(p) for p in thumbs.get_many(top) if p is not None]
            if imgs:
                st.image(imgs, width=64)
            st.button("Open", key=f"open|{c.id}", on_click=open_cluster, args=(c.id,))


def open_cluster(cid: int) -> None:
    st.session_state["cluster"] = cid
    st.session_state["view"] = "Cluster"
    st.session_state["page"] = 1
    clear_selection()


@st.cache_data(show_spinner=False, max_entries=4)
def name_suggestions(run: str, version: int, _store: ReviewStore) -> dict[int, tuple[str, str]]:
    """Suggested name (and its label with the share) per cluster at edit `version`: the members' ImageNet votes."""
    return {c: (s.name, s.label) for c, s in suggested_names(run, _store.assignments()).items()}


def cluster_view(store: ReviewStore, thumbs: ThumbCache, run: Path, data_root: Path, clusters: list) -> None:
    if not clusters:
        st.info("No images in this run.")
        return
    by_id = {c.id: c for c in clusters}
    cid = st.session_state.get("cluster")
    c = by_id[cid]
    st.header(f"{c.name}")
    st.caption(f"cluster id {c.id} · {c.size} images · mean confidence {c.mean_confidence:.2f} · "
               f"{c.n_rejected} rejected · {c.n_unsure} unsure")

    left, mid, right = st.columns(3)
    with left.container(border=True):
        st.text_input("Name", value=c.name, key=f"rename|{c.id}")
        st.button("Rename", key="rename", on_click=lambda: act(
            store.rename, c.id, st.session_state[f"rename|{c.id}"], done="Renamed."))
        suggestion = name_suggestions(str(run), store.version(), store).get(c.id)
        if suggestion and suggestion[0] != c.name:
            st.caption(f"Suggested: {suggestion[1]}")
            st.button("Accept suggested name", key="accept_name", on_click=lambda: act(
                store.rename, c.id, suggestion[0], done="Renamed."))
    with mid.container(border=True):
        others = [o.id for o in clusters if o.id != c.id]
        st.multiselect("Merge these clusters into this one", others, key="merge_sources",
                       format_func=lambda o: f"{by_id[o].name} ({by_id[o].size})")
        st.button("Merge", key="merge", disabled=not others, on_click=lambda: act(
            store.merge, st.session_state.get("merge_sources", []), c.id, done="Merged."))
    with right.container(border=True):
        if c.size >= 2:
            sc1, sc2 = st.columns(2)
            sc1.number_input("Split into k", 2, max(2, min(20, c.size)), 2, key="split_k")
            sc2.selectbox("Method", SPLIT_METHODS, key="split_method")
            st.button("Split", key="split", on_click=lambda: act(
                store.split, c.id, int(st.session_state["split_k"]), method=st.session_state["split_method"],
                done="Split."))
        else:
            st.caption("A single image cannot be split.")

    o1, o2, o3 = st.columns([2, 1, 1])
    order = o1.radio("Order", ["Most confident first", "Least confident first", "Least typical first"], key="order",
                     horizontal=True, help="Least typical: the highest outlier score first (junk, out-of-domain images).")
    per_page = o2.selectbox("Per page", [24, 48, 96], index=1, key="per_page")
    pages = max(1, -(-c.size // per_page))
    if st.session_state.get("page", 1) > pages:
        st.session_state["page"] = pages
    page = o3.number_input(f"Page (of {pages})", 1, pages, key="page") - 1
    members = store.members(c.id, least_confident=order == "Least confident first",
                            least_typical=order == "Least typical first", offset=page * per_page, limit=per_page)
    if st.session_state.get("_sel_cluster") != c.id:  # a selection belongs to one cluster
        clear_selection()
        st.session_state["_sel_cluster"] = c.id
    selection_bar(store, clusters, c.id, [m.path for m in members])
    paths = thumbs.get_many([m.path for m in members])
    for row in range(0, len(members), GRID_COLS):
        cols = st.columns(GRID_COLS)
        for col, m, p in zip(cols, members[row : row + GRID_COLS], paths[row : row + GRID_COLS]):
            with col:
                if p is not None:
                    st.image(str(p), width="stretch")
                else:
                    st.caption("(unreadable)")
                mark = {"rejected": " ✗", "unsure": " ?"}.get(m.status, "")
                st.checkbox(f"{m.confidence:.2f}{mark}", key=f"sel|{m.path}")

    inspect_image(members, run, data_root)


def selection_bar(store: ReviewStore, clusters: list, cid: int, page_paths: list[str]) -> None:
    chosen = selected_paths()
    with st.container(border=True):
        r = st.columns([1.3, 1, 1, 1, 1.2, 1], vertical_alignment="center")
        r[0].markdown(f"**{len(chosen)} selected**")
        r[1].button("Select page", key="select_page",
                    on_click=lambda: st.session_state.update({f"sel|{p}": True for p in page_paths}))
        r[2].button("Clear", key="clear_selection", on_click=clear_selection)
        for col, status, label in ((r[3], "rejected", "Reject"), (r[4], "unsure", "Mark unsure"), (r[5], "ok", "Mark OK")):
            col.button(label, key=f"status|{status}", disabled=not chosen, on_click=lambda s=status: act(
                store.set_status, selected_paths(), s, done=f"Marked {s}.", clear=True))
        names = {o.id: o.name for o in clusters}
        m1, m2, m3 = st.columns([2, 2, 1], vertical_alignment="bottom")
        m1.selectbox("Move to", [NEW_CLUSTER] + [o.id for o in clusters if o.id != cid], key="move_target",
                     format_func=lambda o: "a new cluster" if o == NEW_CLUSTER else names.get(o, str(o)))
        m2.text_input("Name of the new cluster", key="move_name")
        m3.button("Move", key="move", disabled=not chosen, on_click=lambda: act(
            store.move, selected_paths(),
            None if st.session_state["move_target"] == NEW_CLUSTER else st.session_state["move_target"],
            name=st.session_state.get("move_name") or None, done="Moved.", clear=True))


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@st.cache_resource(show_spinner=False, max_entries=4)
def _read_dense_meta(path: str, mtime_ns: int | None) -> dict:
    """Parsed once per version of the file (the key has its mtime), not on every rerun; never mutated."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8")) if mtime_ns is not None else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def dense_meta(run: Path) -> dict:
    """dense/dense.json, or {} when the run has none (or it is unreadable)."""
    meta = run / DENSE / "dense.json"
    return _read_dense_meta(str(meta), _mtime_ns(meta))


@st.cache_resource(show_spinner=False, max_entries=4)
def _read_graph(path: str, mtime_ns: int | None) -> nx.Graph:
    return load_graph(path)


def dense_index(meta: dict) -> dict[str, dict[str, str]]:
    """image path -> its dense.json entry ({"map": ..., "overlay": ...}), from `dense_meta`."""
    images = meta.get("images", [])
    return {d.get("id", d.get("path")): d for d in images if isinstance(d, dict) and (d.get("id") or d.get("path"))}


def inspect_image(members: list, run: Path, data_root: Path) -> None:
    if not members:
        return
    with st.expander("Inspect one image"):
        rel = st.selectbox("Image", [m.path for m in members], key="inspect")
        m = next(x for x in members if x.path == rel)
        try:
            full = safe_path(data_root, rel)
        except SelflabelError as exc:
            st.error(str(exc))
            return
        cols = st.columns(2)
        cols[0].image(str(full), caption=f"{rel} · confidence {m.confidence:.2f} · {m.status}")
        d = dense_index(dense_meta(run)).get(rel)
        if d and d.get("overlay"):
            try:
                cols[1].image(str(safe_path(run / DENSE, d["overlay"])), caption="concept mask overlay")
            except SelflabelError as exc:
                cols[1].error(str(exc))


@st.cache_resource(show_spinner="Finding neighbours ...", max_entries=2)
def curation_inputs(run: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """(centred unit features, neighbour indices) of a run: neighbors.npz when the run has it, else computed."""
    x = centred_unit(np.load(Path(run) / FEATURES, mmap_mode="r", allow_pickle=False))
    nb_file = Path(run) / NEIGHBOURS
    nb = load_neighbours(nb_file) if nb_file.is_file() else neighbours_of(x)
    return x, nb.indices


@st.cache_data(show_spinner="Looking for suggestions ...", max_entries=4)
def open_suggestions(run: str, mtime_ns: int, version: int, _store: ReviewStore) -> list[Suggestion]:
    """Suggestions for the state at edit `version`, less those already accepted or dismissed."""
    x, idx = curation_inputs(run, mtime_ns)
    done = _store.suggestion_states()
    return [s for s in suggest(x, _store.assignments(), idx) if s.key not in done]


def accept_suggestion(store: ReviewStore, s: Suggestion) -> int | None:
    """The edit a suggestion proposes, recorded with its key (undo reopens it)."""
    if s.kind == "merge":
        return store.merge([s.clusters[0]], s.clusters[1], suggestion=s.key)
    if s.kind == "move":
        return store.move([store.base_rows[i].path for i in s.rows], s.clusters[1], suggestion=s.key)
    return store.split(s.clusters[0], 2, suggestion=s.key)


def suggestions_view(store: ReviewStore, thumbs: ThumbCache, run: Path, clusters: list) -> None:
    feats = run / FEATURES
    found = open_suggestions(str(run), feats.stat().st_mtime_ns, store.version(), store)
    names = {c.id: c.name for c in clusters}
    st.header(f"Suggestions ({len(found)})")
    st.caption("Edits the neighbours of the images point to: clusters to merge, images in the wrong cluster, "
               "clusters with two kinds of thing inside. Accepting is one edit (undo reverts it); a dismissed "
               "suggestion is not offered again.")
    for s in found[:SUGGESTIONS_SHOWN]:
        with st.container(border=True):
            left, right = st.columns([5, 1])
            left.markdown(s.describe(names))
            if s.kind == "merge":
                preview = [m.path for c in s.clusters for m in store.members(c, limit=4)]
            else:
                rows = s.rows if s.kind == "move" else s.rows + tuple(m.idx for m in store.members(s.clusters[0], limit=4))
                preview = [store.base_rows[i].path for i in rows[:8]]
            imgs = [str(p) for p in thumbs.get_many(preview) if p is not None]
            if imgs:
                left.image(imgs, width=64)
            right.button("Accept", key=f"accept|{s.key}", on_click=act, args=(accept_suggestion, store, s),
                         kwargs={"done": f"Accepted: {s.describe(names)}"})
            right.button("Dismiss", key=f"dismiss|{s.key}", on_click=act, args=(store.dismiss, s.key),
                         kwargs={"summary": s.describe(names), "done": "Dismissed."})


def duplicate_groups(store: ReviewStore) -> dict[str, list[str]]:
    """Kept image -> its near-duplicate copies, from labels.csv's duplicate_of column."""
    groups: dict[str, list[str]] = {}
    for r in store.base_rows:
        if r.extra.get(DUPLICATE_COLUMN):
            groups.setdefault(r.extra[DUPLICATE_COLUMN], []).append(r.path)
    return groups


def keep_one(store: ReviewStore, group: list[str], keep: str) -> int | None:
    """Reject every image of a near-duplicate group but `keep`: one edit."""
    return store.set_status([p for p in group if p != keep], "rejected")


def duplicates_view(store: ReviewStore, thumbs: ThumbCache) -> None:
    groups = duplicate_groups(store)
    st.header(f"Near-duplicates ({len(groups)} groups, {sum(map(len, groups.values()))} copies)")
    if not groups:
        st.info("No near-duplicates in this run (or it was labelled before they were looked for).")
        return
    all_copies = [p for copies in groups.values() for p in copies]
    st.button("Reject every copy (keep the first of each group)", key="dedup_all", on_click=act,
              args=(store.set_status, all_copies, "rejected"), kwargs={"done": f"Rejected {len(all_copies)} copies."})
    pages = max(1, -(-len(groups) // GROUPS_PER_PAGE))
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="dup_page") - 1
    for gi, (kept, copies) in enumerate(list(groups.items())[page * GROUPS_PER_PAGE:(page + 1) * GROUPS_PER_PAGE]):
        group = [kept, *copies]
        status = {p: (store.member(p).status if store.member(p) else "?") for p in group}
        with st.container(border=True):
            cols = st.columns(min(len(group), 6) + 1)
            for col, path, thumb in zip(cols, group, thumbs.get_many(group[:6])):
                if thumb is not None:
                    col.image(str(thumb), width=96)
                col.caption(f"{path} · {status[path]}")
            with cols[-1]:
                key = f"{page}.{gi}"
                st.selectbox("Keep", group, key=f"keep|{key}", label_visibility="collapsed")
                st.button("Keep one, reject the rest", key=f"dedup|{key}", on_click=lambda g=group, k=key: act(
                    keep_one, store, g, st.session_state[f"keep|{k}"], done="Kept one, rejected the rest."))


def map_view(store: ReviewStore, run: Path, clusters: list) -> None:
    names = {c.id: c.name for c in clusters}
    st.header("Cluster sizes")
    sizes = pd.DataFrame({"cluster": [c.name for c in clusters], "images": [c.size for c in clusters]})
    st.altair_chart(alt.Chart(sizes).mark_bar().encode(
        x=alt.X("cluster:N", sort="-y"), y="images:Q", tooltip=["cluster", "images"]), width="stretch")

    feats = run / FEATURES
    st.header("Feature map")
    if not feats.is_file():
        st.info("This run has no features.npy.")
        return
    methods = ["PCA"] + (["UMAP"] if umap is not None else [])
    method = st.radio("Projection", methods, horizontal=True, key="projection",
                      help="UMAP appears when the umap-learn package is installed.")
    xy = embedding_2d(str(feats), feats.stat().st_mtime_ns, method)
    assign = store.assignments()
    paths = [r.path for r in store.base_rows]
    df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "cluster": [names.get(int(a), str(a)) for a in assign], "path": paths})
    if len(df) > MAP_POINTS:  # the browser draws every point: keep it responsive
        df = df.sample(MAP_POINTS, random_state=0)
        st.caption(f"{MAP_POINTS} of {len(paths)} images, drawn at random.")
    st.altair_chart(alt.Chart(df).mark_circle(size=18, opacity=0.7).encode(
        x=alt.X("x:Q", title=f"{method} 1"), y=alt.Y("y:Q", title=f"{method} 2"),
        color=alt.Color("cluster:N", legend=alt.Legend(columns=2) if len(names) > 20 else alt.Legend()),
        tooltip=["path", "cluster"]).interactive(), width="stretch")


def dense_view(store: ReviewStore, run: Path) -> None:
    dense = run / DENSE
    meta = dense_meta(run)
    renamed = store.concept_names()
    concepts = [{**c, "name": renamed.get(int(c["id"]), str(c.get("name", c["id"])))}
                for c in meta.get("concepts", []) if isinstance(c, dict) and "id" in c]
    names = {int(c["id"]): c["name"] for c in concepts}
    graph_file = dense / "graph.json"
    if graph_file.is_file():
        st.header("Concept graph")
        parts = st.toggle("Show the part graph (nodes = parts, coloured by concept)", key="part_graph")
        draw_graph(_read_graph(str(graph_file), _mtime_ns(graph_file)), names, parts=parts)
    if concepts:
        cols = [k for k in ("id", "name", "kind", "area_fraction", "n_images", "n_annotations") if k in concepts[0]]
        st.dataframe(pd.DataFrame([{k: c.get(k) for k in cols} for c in concepts]), hide_index=True)
        # a concept's name is its COCO category; two concepts given one name export as one category
        left, mid, right = st.columns([2, 3, 1], vertical_alignment="bottom")
        left.selectbox("Concept", list(names), format_func=lambda c: f"{c}: {names[c]}", key="concept")
        mid.text_input("New name", key="concept_name", placeholder="e.g. car")
        right.button("Rename concept", key="rename_concept", on_click=lambda: act(
            store.rename_concept, st.session_state["concept"], st.session_state.get("concept_name") or "",
            known=list(names), done="Concept renamed."))
    overlays = sorted((dense / "overlays").glob("*.png"))
    st.header(f"Mask overlays ({len(overlays)})")
    by_file = {v.get("overlay"): k for k, v in dense_index(meta).items()}
    for row in range(0, min(len(overlays), 48), 4):
        cols = st.columns(4)
        for col, p in zip(cols, overlays[row : row + 4]):
            rel = p.relative_to(dense).as_posix()
            col.image(str(safe_path(dense, rel)), caption=by_file.get(rel, p.name))


def draw_graph(g, names: dict[int, str], parts: bool = False) -> None:
    """The concept graph `g` from graph.json (nodes are parts with a `concept` attribute).

    By default the parts are merged into one node per concept (area summed, edge weights summed);
    `parts=True` draws every part, coloured by its concept.
    """
    if g.number_of_nodes() == 0:
        st.caption("The graph is empty.")
        return
    if not parts and all("concept" in d for _, d in g.nodes(data=True)):
        q = nx.Graph()
        for _, d in g.nodes(data=True):
            c = int(d["concept"])
            if c not in q:
                q.add_node(c, size=0.0, color=d.get("color", "#8fb3de"), name=names.get(c, concept_name(c)))
            q.nodes[c]["size"] += float(d.get("area_fraction", 1.0))
        for u, v, d in g.edges(data=True):
            cu, cv = int(g.nodes[u]["concept"]), int(g.nodes[v]["concept"])
            if cu != cv:
                w = float(d.get("weight", 1.0))
                q.add_edge(cu, cv, weight=q.get_edge_data(cu, cv, {"weight": 0.0})["weight"] + w)
        g, labels = q, {n: d["name"] for n, d in q.nodes(data=True)}
    else:
        labels = {n: "" for n in g.nodes} if g.number_of_nodes() > 40 else {n: str(n) for n in g.nodes}
    pos = nx.spring_layout(g, seed=0, weight="weight")
    size = np.array([float(d.get("size", d.get("area_fraction", 1.0))) for _, d in g.nodes(data=True)])
    size = 80 + 1500 * size / max(size.max(), 1e-9)
    w = np.array([float(d.get("weight", 1.0)) for _, _, d in g.edges(data=True)] or [1.0])
    width = 0.3 + 4 * w / max(w.max(), 1e-9)
    colors = [d.get("color", "#8fb3de") for _, d in g.nodes(data=True)]
    fig, ax = plt.subplots(figsize=(7, 4))
    nx.draw_networkx(g, pos, ax=ax, node_size=size, width=width[: g.number_of_edges()], node_color=colors,
                     edge_color="#999999", font_size=8, labels=labels)
    ax.axis("off")
    st.pyplot(fig, width="content")
    plt.close(fig)


def export_view(run: Path) -> None:
    st.header("Export")
    st.markdown(f"Writes into `{run / EXPORTS}` with your names, moves, merges and splits applied; "
                "rejected images are left out, unsure ones are kept and marked in the CSV.")
    st.checkbox("Leave out near-duplicate copies (one image of each group is kept)", key="no_duplicates")
    formats = formats_for(run)
    cols = st.columns(len(formats))
    for col, fmt in zip(cols, formats):
        col.button(f"Export {fmt}", key=f"export|{fmt}", on_click=do_export, args=(run, fmt))
    for fmt, (path, n) in st.session_state.get("exported", {}).items():
        st.markdown(f"- **{fmt}**: {n} images → `{path}`")
        if Path(path).is_file():  # csv, coco: also to the browser's downloads
            st.download_button(f"Download {Path(path).name}", Path(path).read_bytes(), file_name=Path(path).name,
                               key=f"download|{fmt}")


def do_export(run: Path, fmt: str) -> None:
    try:
        path, n = export_run(run, fmt, include_duplicates=not st.session_state.get("no_duplicates", False))
    except SelflabelError as exc:
        st.session_state["flash"] = ("error", str(exc))
        return
    st.session_state.setdefault("exported", {})[fmt] = (str(path), n)
    st.session_state["flash"] = ("success", f"Exported {n} images as {fmt} to {path}")


# ------------------------------------------------------------------------- page
def main() -> None:
    st.set_page_config(page_title="selflabel review", layout="wide")
    if not authorised():  # before anything is read, drawn or registered as a callback
        st.error("This review app needs its access token: open the address `selflabel app` printed "
                 f"(it ends in `?{TOKEN_PARAM}=...`).")
        st.stop()
        return
    run = run_dir_from_env()
    if run is None:
        st.error("No run folder given. Start the app with `selflabel app RUN` "
                 "or `streamlit run app/review_app.py -- RUN`.")
        st.stop()
        return  # st.stop() does not raise outside a Streamlit script run
    try:
        manifest = read_manifest(run)
        store = get_store(str(run.resolve()))
    except SelflabelError as exc:
        st.error(str(exc))
        st.stop()
        return
    data_root = Path(manifest.get("data_root", "")).resolve()
    thumbs = ThumbCache(run, data_root)
    view, clusters = sidebar(store, run, manifest)
    flash = st.session_state.pop("flash", None)
    if flash:
        getattr(st, flash[0])(flash[1])
    if view == "Overview":
        overview(store, thumbs, clusters)
    elif view == "Suggestions":
        suggestions_view(store, thumbs, run, clusters)
    elif view == "Duplicates":
        duplicates_view(store, thumbs)
    elif view == "Cluster":
        cluster_view(store, thumbs, run, data_root, clusters)
    elif view == "Map":
        map_view(store, run, clusters)
    elif view == "Dense":
        dense_view(store, run)
    else:
        export_view(run)


if __name__ == "__main__":
    main()
