"""How ATP works: a guided tour, step by step, on the current model and text."""

import streamlit as st

from atp_app import navigation, runtime, widgets
from atp_app.sidebar import model_caption, page_inputs
from atp_viz.figures.tour import data as tour_data
from atp_viz.figures.tour.layout import presenter_layout
from atp_viz.figures.tour.steps import STEPS

# Large type for a lecture hall; local CSS only (no web fonts: the app stays offline).
PRESENTER_CSS = """
<style>
[data-testid="stMarkdownContainer"] p, [data-testid="stMarkdownContainer"] li { font-size: 1.5rem;
  line-height: 1.55; }
[data-testid="stHeading"] h1 { font-size: 3.2rem; }
[data-testid="stHeading"] h3 { font-size: 2.4rem; }
.katex { font-size: 1.7em !important; }
[data-testid="stCaptionContainer"] { font-size: 1.2rem; }
</style>
"""
STEP_KEYS = ("tour_layer", "tour_head", "tour_rank", "tour_rank_L")

navigation.use_this_navigation()

# Widgets that are not drawn in a run lose their state (Streamlit cleans it up); presenter mode hides
# the layer/head/rank controls, so their values are re-saved here to survive it (the documented idiom).
for _key in STEP_KEYS:
    if _key in st.session_state:
        st.session_state[_key] = st.session_state[_key]

st.title("How ATP works")
presenter = st.toggle(
    "Presenter mode",
    key="tour_presenter",
    help="Large fonts for a projector; the layer, head and rank controls are hidden (their values are "
    "kept). Page Down / Page Up (a presentation clicker) move between steps.",
)
if presenter:
    st.markdown(PRESENTER_CSS, unsafe_allow_html=True)
else:
    st.markdown(
        "A walk through *Attention on Top Principal keys* (Niu, Prakash, Avestimehr, arXiv 2403.02352) on "
        "the model and text picked in the sidebar, from the tokens to what it costs. Every figure is "
        "computed live. The method is rebuilt from the paper's abstract and its first author's slides."
    )

sel, loaded, cap = page_inputs()
info = cap.info
L = cap.n_tokens
steps = STEPS

# Keep the controls valid when the model or text changes (fewer layers or heads, another length).
if st.session_state.get("tour_layer", 0) >= info.n_layers:
    st.session_state.tour_layer = info.n_layers // 2
if st.session_state.get("tour_head", 0) >= info.n_heads:
    st.session_state.tour_head = 0
if st.session_state.get("tour_rank_L") != L:
    st.session_state.tour_rank = tour_data.default_rank(L)  # a new text starts at r = L/2
    st.session_state.tour_rank_L = L
st.session_state.setdefault("tour_layer", info.n_layers // 2)
st.session_state.setdefault("tour_step", 0)

if not presenter:
    st.caption(model_caption(loaded))
    c1, c2, c3 = st.columns([1, 1, 2])
    c1.selectbox("Layer", list(range(info.n_layers)), key="tour_layer")
    c2.selectbox(
        "Query head",
        list(range(info.n_heads)),
        key="tour_head",
        help="Steps 6 and 7 (principal keys, attention) use this head; with grouped-query attention, its "
        "key/value head.",
    )
    c3.slider(
        "Rank r (principal keys)",
        1,
        max(L, 2),
        key="tour_rank",
        disabled=L < 2,
        help="How many principal directions ATP keeps; starts at L/2.",
    )
layer = st.session_state.tour_layer
head = st.session_state.get("tour_head", 0)
rank = min(st.session_state.tour_rank, L)


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
    if presenter:
        fig = presenter_layout(fig)
    st.plotly_chart(fig, key="tour_fig")
    # In presenter mode the download has the large fonts too: ready for a slide.
    widgets.figure_downloads(fig, f"tour_{st.session_state.tour_step + 1}_{step.key}")
