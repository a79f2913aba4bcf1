"""How ATP works: a guided tour, step by step, on the current model and text."""

import streamlit as st

from atp_app import navigation, runtime, state, widgets
from atp_app.sidebar import model_caption, page_inputs
from atp_viz.deploy import urlstate
from atp_viz.figures.tour import data as tour_data
from atp_viz.figures.tour.steps import STEPS

navigation.use_this_navigation()

st.title("How ATP works")
# Presenter mode is the view's (every page has it; a link carries it as present=1): this toggle and the
# sidebar's are the same setting.
presenter = st.toggle(
    "Presenter mode",
    help="Large fonts for a projector; the layer, head and rank controls are hidden (their values are "
    "kept). Page Down / Page Up (a presentation clicker) move between steps.",
    **state.bind("tour_presenter", "present", state.get("present") == "1", lambda v: "1" if v else None),
)
if not presenter:
    st.markdown(
        "A walk through *Attention on Top Principal keys* (Niu, Prakash, Avestimehr, arXiv 2403.02352) on "
        "the model and text picked in the sidebar, from the tokens to what it costs. Every figure is "
        "computed live. The method is rebuilt from the paper's abstract and its first author's slides."
    )

sel, loaded, cap = page_inputs()
info = cap.info
L = cap.n_tokens
steps = STEPS
st.session_state.setdefault("tour_step", 0)

# Layer, head and rank are the view's (the explorer's too: atp_app.state), so they survive presenter mode
# (which hides the controls), page switches and links.
if not presenter:
    st.caption(model_caption(loaded))
    c1, c2, c3 = st.columns([1, 1, 2])
    c1.selectbox(
        "Layer", list(range(info.n_layers)), **state.bind("tour_layer", "layer", state.index("layer"))
    )
    c2.selectbox(
        "Query head",
        list(range(info.n_heads)),
        help="Steps 6 and 7 (principal keys, attention) use this head; with grouped-query attention, its "
        "key/value head.",
        **state.bind("tour_head", "head", state.index("head")),
    )
    c3.slider(
        "Rank r (principal keys)",
        1,
        max(L, 2),
        disabled=L < 2,
        help="How many principal directions ATP keeps; the explorer's rank, in tokens.",
        **state.bind("tour_rank", "rank", state.rank_tokens(L), lambda r: urlstate.format_rank("tokens", r)),
    )
layer, head = state.index("layer"), state.index("head")
rank = state.rank_tokens(L)
# What the explorer's view sets and the tour does not show: said, not silently dropped.
_differs = []
if state.get("split") not in (None, "one"):
    _differs.append(
        f"its own rank in each layer ({state.get('split')}); the tour keeps r = {rank} in every layer"
    )
if state.get("basis") not in (None, "input") or state.get("centre") == "1":
    _differs.append("a basis from the keys or centred; the tour decomposes X itself, as the paper does")
if _differs and not presenter:
    st.caption("The explorer's view has " + " and ".join(_differs) + ".")


def _go(delta: int) -> None:
    st.session_state.tour_step = min(max(st.session_state.tour_step + delta, 0), len(steps) - 1)


n1, n2, n3 = st.columns([1.4, 3, 1.4], vertical_alignment="bottom")
n1.button(
    "Previous",
    key="tour_prev",
    icon=":material/arrow_back:",
    on_click=_go,
    args=(-1,),
    disabled=st.session_state.tour_step == 0,
    width="stretch",
    shortcut="PageUp",  # what presentation clickers send
    help="Previous step (Page Up)",
)
n2.selectbox(
    "Step",
    list(range(len(steps))),
    key="tour_step",
    persist_state="session",  # the step survives a visit to another page
    format_func=lambda i: f"{i + 1}. {steps[i].title}",
    label_visibility="collapsed",
)
n3.button(
    "Next",
    key="tour_next",
    icon=":material/arrow_forward:",
    on_click=_go,
    args=(1,),
    disabled=st.session_state.tour_step == len(steps) - 1,
    width="stretch",
    shortcut="PageDown",
    help="Next step (Page Down)",
)


@st.cache_resource(show_spinner="Decomposing X...", max_entries=8)
def _data(
    model_key: str, text: str, layer: int, head: int, rank: int, max_side: int, max_map_tokens: int
) -> tour_data.TourData:
    # Shared read-only between sessions; its maps are computed once, on first use (under a lock of
    # this object only: other sessions' tours never wait for it).
    return tour_data.tour_data(
        runtime.get_capture(model_key, text),
        layer,
        head,
        rank,
        max_side=max_side,
        max_map_tokens=max_map_tokens,
    )


limits = runtime.current_settings()  # the deployment's display size and map limit, as the explorer uses them
step = steps[st.session_state.tour_step]
data = _data(sel.model_key, sel.text, layer, head, rank, limits.map_display_size, limits.max_map_tokens)
st.subheader(f"Step {st.session_state.tour_step + 1} of {len(steps)}: {step.title}")
if presenter:
    st.caption(f"{info.label}: layer {layer}, query head {head}, r = {data.rank} of L = {L:,} tokens")
st.markdown(step.explain(data))
st.latex(step.latex(data))
refusal = step.refusal(data)
if refusal:
    st.info(refusal)  # L x L maps above the deployment's limit are not even computed
else:
    with st.spinner("Drawing..."):
        fig = step.build(data)
    widgets.chart(fig, key="tour_fig")  # both with presenter mode's large fonts when it is on
    # a file per setting: several saves do not overwrite each other
    where = f"{widgets.model_file_part(sel.model_key)}_L{layer}_H{head}_r{data.rank}"
    widgets.figure_downloads(fig, f"tour_{st.session_state.tour_step + 1}_{step.key}_{where}")
